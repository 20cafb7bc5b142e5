"""Train a defense.  python train.py [group=option ...] [key=value ...]  (see conf/train.yaml)."""

import hydra
from omegaconf import DictConfig

from sdd.cli import user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@user_errors  # a fixable failure: one line naming the fix (the traceback with HYDRA_FULL_ERROR=1)
def main(cfg: DictConfig) -> None:
    from sdd.training import print_summary, train

    print_summary(train(cfg))


if __name__ == "__main__":
    main()
