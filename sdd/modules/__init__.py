"""LightningModules: the SFT objective (SDD, SDD_reject, safety alignment, attacks), SEAM and the baseline defenses."""

from sdd.modules.deepalign import DeepAlignModule
from sdd.modules.sft import SFTModule
from sdd.modules.simpo import SimPOModule
from sdd.modules.tar import TARModule

__all__ = ["SFTModule", "DeepAlignModule", "SimPOModule", "TARModule"]
