"""LightningDataModules: every one turns conversations into masked batches through sdd.chat."""

from sdd.datamodules.conversations import (
    ConversationDataModule,
    InstructionAnswerDataModule,
    MultiTurnDataModule,
    PadCollator,
)
from sdd.datamodules.sdd import SDD_REJECT_PREFIX, SDDDataModule
from sdd.datamodules.sdd_pairs import IrrelevantAnswerMatcher, SDDPairBuilder
from sdd.datamodules.streams import MultiStreamDataModule

__all__ = [
    "ConversationDataModule",
    "InstructionAnswerDataModule",
    "IrrelevantAnswerMatcher",
    "MultiStreamDataModule",
    "MultiTurnDataModule",
    "PadCollator",
    "SDDDataModule",
    "SDDPairBuilder",
    "SDD_REJECT_PREFIX",
]
