"""One point of a sweep: defense -> attack -> evaluate, reusing finished stages.  (conf/pipeline.yaml)

    python pipeline.py -m experiment=tiny_matrix
"""

import hydra
from omegaconf import DictConfig

from sdd import conf_options  # noqa: F401  registers ${sdd.options:<group>} before Hydra builds the sweeper
from sdd.cli import user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="pipeline")
@user_errors  # a fixable failure: one line naming the fix (the traceback with HYDRA_FULL_ERROR=1)
def main(cfg: DictConfig) -> None:
    from sdd.pipeline import print_point, run_pipeline

    print_point(run_pipeline(cfg))


if __name__ == "__main__":
    main()
