"""LightningModules: the SFT objective (SDD, SDD_reject, safety alignment, attacks), SEAM and the baseline defenses."""

from sdd.modules.booster import BoosterModule
from sdd.modules.deepalign import DeepAlignModule
from sdd.modules.repnoise import RepNoiseModule
from sdd.modules.seam import SEAMModule
from sdd.modules.sft import SFTModule
from sdd.modules.simpo import SimPOModule
from sdd.modules.tar import TARModule
from sdd.modules.vaccine import TVaccineModule, VaccineModule

__all__ = ["SFTModule", "DeepAlignModule", "SimPOModule", "TARModule", "SEAMModule",
           "BoosterModule", "VaccineModule", "TVaccineModule", "RepNoiseModule"]
