"""LightningDataModules: every one turns conversations into masked batches through sdd.chat."""

from sdd.datamodules.conversations import (
    ConversationDataModule,
    InstructionAnswerDataModule,
    MultiTurnDataModule,
    PadCollator,
)
from sdd.datamodules.preference import PreferenceDataModule
from sdd.datamodules.safety_recovery import SafetyRecoveryDataModule
from sdd.datamodules.sdd import SDDDataModule
from sdd.datamodules.sdd_pairs import IrrelevantAnswerMatcher, SDDPairBuilder
from sdd.datamodules.streams import MultiStreamDataModule

__all__ = [
    "ConversationDataModule",
    "InstructionAnswerDataModule",
    "IrrelevantAnswerMatcher",
    "MultiStreamDataModule",
    "MultiTurnDataModule",
    "PadCollator",
    "PreferenceDataModule",
    "SafetyRecoveryDataModule",
    "SDDDataModule",
    "SDDPairBuilder",
]
