"""SDD and SDD_reject data: one DataModule, the refusal prefix is the only difference."""

from __future__ import annotations

import logging
from typing import Any

from sdd.chat import Conversation, instruction_answer
from sdd.datamodules.conversations import ConversationDataModule
from sdd.datamodules.sdd_pairs import SDDPairBuilder

log = logging.getLogger(__name__)

# SDD paper §6.5: SDD_reject puts this fixed statement (and a blank line) before every answer.
SDD_REJECT_PREFIX = (
    "I refuse to answer your question for responsible and ethical reasons. "
    "I provided an irrational answer to your question.\n\n"
)


class SDDDataModule(ConversationDataModule):
    """<harmful instruction, irrelevant high-quality answer> pairs for SDD training.

    Args:
        builder: the :class:`SDDPairBuilder` that builds (or reuses) the pair set.
        answer_prefix: text put before every answer (``SDD_REJECT_PREFIX`` for SDD_reject).
        **kwargs: batching and tokenization options of :class:`ConversationDataModule`.
    """

    def __init__(self, builder: SDDPairBuilder, answer_prefix: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.builder = builder
        self.answer_prefix = answer_prefix or ""
        self.manifest: dict[str, Any] | None = None
        self._conversations: list[Conversation] | None = None

    def build_conversations(self) -> list[Conversation]:
        if self._conversations is None:
            pairs, self.manifest = self.builder.build()
            self._conversations = [
                instruction_answer(p["instruction"], self.answer_prefix + p["answer"]) for p in pairs
            ]
        return self._conversations
