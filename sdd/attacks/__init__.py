"""Attacks on a (defended) model that are not plain harmful fine-tuning of ``sdd.modules``.

Every ``conf/attack/`` entry declares ``attack_kind``:

- ``fine_tuning``: ``sdd.training.train`` on the attack's data (MFT, BFT, jailbreak-tuning);
- ``weight_edit``: a procedure that edits the weights and saves a transformers folder (refusal-direction
  ablation);
- ``evaluation``: applied while the evaluation generates (prefilling, embedding-space suffixes); it adds
  variants to the evaluation of the attacked model (``eval_attacks``).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from sdd.errors import ConfigError, UserError

ATTACK_KINDS = ("fine_tuning", "weight_edit", "evaluation")


class EvaluationAttackError(UserError, ValueError):
    """An evaluation-time attack was given to a command that changes weights."""


def run_attack(cfg: DictConfig) -> dict[str, Any]:
    """Attack the model of ``cfg`` as its ``attack_kind`` says and save the attacked model.

    Returns:
        At least ``model_dir`` (the saved transformers folder), ``global_step`` and ``metrics``:
        :func:`sdd.training.train`'s summary, or the weight edit's.

    Raises:
        EvaluationAttackError: an ``evaluation`` attack, which only ``evaluate.py`` (or a pipeline chain) runs.
        ConfigError: an unknown ``attack_kind``, or a weight edit without its ``weight_edit`` procedure.
    """
    kind = cfg.get("attack_kind", "fine_tuning")
    name = cfg.get("attack_name", "<name>")
    if kind == "fine_tuning":
        from sdd.training import train

        return train(cfg)
    if kind == "weight_edit":
        from hydra.utils import instantiate

        if not cfg.get("weight_edit") or "_target_" not in cfg.weight_edit:
            raise ConfigError(
                f"attack={name} is a weight_edit attack without a procedure. Fix: set weight_edit._target_ "
                "in its conf/attack entry (e.g. sdd.attacks.refusal_ablation.RefusalDirectionAblation)."
            )
        return instantiate(cfg.weight_edit, _convert_="all").run(cfg)
    if kind == "evaluation":
        raise EvaluationAttackError(
            f"attack={name} is an evaluation-time attack: it changes how answers are generated, not the weights, so "
            f"attack.py has nothing to train. Fix: python evaluate.py model=<folder> attack={name}, or in a pipeline "
            f"point.attack=<weight attack>+{name} (e.g. point.attack=mft_advbench+{name})."
        )
    raise ConfigError(
        f"attack_kind={kind!r} (attack={name}) is not one of {', '.join(ATTACK_KINDS)}. Fix the "
        "attack_kind of its conf/attack entry."
    )
