"""Evaluate a model's harmfulness, benign behaviour and capability.

python evaluate.py model=<folder or Hub id>  (conf/eval.yaml)
"""

import hydra
from omegaconf import DictConfig

from sdd.cli import user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@user_errors  # a fixable failure: one line naming the fix (the traceback with HYDRA_FULL_ERROR=1)
def main(cfg: DictConfig) -> None:
    from sdd.evaluation.run import evaluate, markdown_summary

    print(markdown_summary(evaluate(cfg)))


if __name__ == "__main__":
    main()
