"""One point of a sweep: defense -> attack -> evaluate, reusing finished stages.  (conf/pipeline.yaml)

python pipeline.py -m experiment=tiny_matrix
python pipeline.py -m experiment=worst_case point.defense=sdd   # an Optuna search: returns its objective
"""

import hydra
from omegaconf import DictConfig

from sdd import conf_options  # noqa: F401  registers ${sdd.options:<group>} before Hydra builds the sweeper
from sdd.cli import user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="pipeline")
@user_errors  # a fixable failure: one line naming the fix (the traceback with HYDRA_FULL_ERROR=1)
def main(cfg: DictConfig) -> float | None:
    if cfg.get("search") is not None:  # a search trial (experiment=worst_case): the sweeper's objective
        from sdd.worst_case import run_trial

        return run_trial(cfg)
    from sdd.pipeline import print_point, run_pipeline

    print_point(run_pipeline(cfg))
    return None


if __name__ == "__main__":
    main()
