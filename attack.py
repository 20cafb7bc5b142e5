"""An attack on a model.  python attack.py model=<folder or Hub id> attack=<name>  (conf/attack.yaml)."""

import hydra
from omegaconf import DictConfig

from sdd.cli import user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="attack")
@user_errors  # a fixable failure: one line naming the fix (the traceback with HYDRA_FULL_ERROR=1)
def main(cfg: DictConfig) -> None:
    from sdd.attacks import run_attack
    from sdd.training import print_summary

    print_summary(run_attack(cfg))


if __name__ == "__main__":
    main()
