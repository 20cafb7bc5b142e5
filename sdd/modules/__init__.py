"""LightningModules: the SFT objective (SDD, SDD_reject, safety alignment, attacks), later SEAM and baselines."""

from sdd.modules.sft import SFTModule

__all__ = ["SFTModule"]
