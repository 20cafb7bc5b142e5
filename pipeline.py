"""One point of a sweep: defense -> attack -> evaluate, reusing finished stages.  (conf/pipeline.yaml)

    python pipeline.py -m experiment=tiny_matrix
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="pipeline")
def main(cfg: DictConfig) -> None:
    from sdd.pipeline import print_point, run_pipeline

    print_point(run_pipeline(cfg))


if __name__ == "__main__":
    main()
