"""The options of a config group, as a config value: ``${sdd.options:<group>[,<value>...]}``.

A sweep over every defense and every attack names none of them::

    hydra:
      sweeper:
        params:
          point.defense: ${sdd.options:defense,none}   # none,booster,deepalign,...,vaccine
          point.attack: ${sdd.options:attack,none}

resolves to the extra values given after the group, then the names of ``conf/<group>/*.yaml`` (sorted),
comma-joined: Hydra's sweep syntax. A file added to ``conf/<group>/`` joins every sweep that uses it.
The resolver is registered when this module is imported; ``pipeline.py`` imports it before Hydra
starts (Hydra resolves ``hydra.sweeper.params`` when it builds the sweeper). A sweep value given on the
command line (``point.defense=none,sdd``) still replaces the discovered one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
RESOLVER = "sdd.options"


def group_options(group: str) -> list[str]:
    """The options of config group ``group`` (``conf/<group>/*.yaml`` names), sorted.

    Raises:
        ValueError: ``conf/<group>/`` has no option (a misspelt group), naming the groups there are.
    """
    options = sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))
    if not options:
        groups = sorted(path.name for path in CONF_DIR.iterdir() if path.is_dir())
        raise ValueError(
            f"${{{RESOLVER}:{group}}}: conf/{group}/ holds no option. Fix the group name: one of {', '.join(groups)}."
        )
    return options


def options_value(group: str, *first: Any) -> str:
    """``first`` then the options of ``group`` (those not already in ``first``), comma-joined."""
    leading = [str(value) for value in first]
    return ",".join([*leading, *(option for option in group_options(str(group)) if option not in leading)])


def register() -> None:
    """Register ``${sdd.options:...}`` with OmegaConf (again: a no-op)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, options_value)


def sweep_params(experiment: str) -> dict[str, str]:
    """The resolved ``hydra.sweeper.params`` of ``conf/experiment/<experiment>.yaml`` (key -> sweep text).

    What ``python pipeline.py -m experiment=<experiment>`` sweeps, with every ``${sdd.options:...}``
    expanded; ``{}`` for an experiment without sweep parameters.
    """
    register()
    config = OmegaConf.load(CONF_DIR / "experiment" / f"{experiment}.yaml")
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None)
    if params is None:
        return {}
    return {str(key): str(value) for key, value in OmegaConf.to_container(params, resolve=True).items()}


register()
