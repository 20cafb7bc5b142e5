"""LightningModules: the SFT objective (SDD, SDD_reject, safety alignment, attacks), SEAM and the baseline defenses.

:class:`SFTModule` is also the base class and contract of every defense (:mod:`sdd.modules.sft`); the
operations on models they share are in :mod:`sdd.modules.ops`, the LightningModule pieces in
:mod:`sdd.modules.common`.
"""

from sdd.modules.booster import BoosterModule
from sdd.modules.deepalign import DeepAlignModule
from sdd.modules.repnoise import RepNoiseModule
from sdd.modules.seam import SEAMModule
from sdd.modules.sft import SFTModule
from sdd.modules.simpo import SimPOModule
from sdd.modules.tar import TARModule
from sdd.modules.vaccine import TVaccineModule, VaccineModule

__all__ = [
    "SFTModule",
    "DeepAlignModule",
    "SimPOModule",
    "TARModule",
    "SEAMModule",
    "BoosterModule",
    "VaccineModule",
    "TVaccineModule",
    "RepNoiseModule",
]
