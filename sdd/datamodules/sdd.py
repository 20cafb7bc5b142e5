"""SDD and SDD_reject data: one DataModule, the refusal prefix is the only difference."""

from __future__ import annotations

import logging
from typing import Any

from sdd.chat import Conversation, instruction_answer
from sdd.datamodules.conversations import ConversationDataModule
from sdd.datamodules.retention import retention_stream
from sdd.datamodules.sdd_pairs import SDDPairBuilder

log = logging.getLogger(__name__)


class SDDDataModule(ConversationDataModule):
    """<harmful instruction, irrelevant high-quality answer> pairs for SDD training.

    Optionally mixed with a benign retention stream (benign instructions with their own answers), a
    remedy for small backbones that generalise the irrelevant answers to every prompt. The paper's
    recipe has none: ``retain_ratio`` defaults to 0, which loads no retention source and leaves the
    data exactly as without it.

    Args:
        builder: the :class:`SDDPairBuilder` that builds (or reuses) the pair set.
        answer_prefix: text put before every SDD answer (SDD_reject's refusal statement, paper §6.5, set in
            ``conf/data/sdd_reject.yaml``); never
            before retention answers.
        retain: a data source of benign instructions with their own answers (columns ``instruction``,
            ``answer``; ``corpus.benign`` in ``conf/data/sdd.yaml``); read only when ``retain_ratio > 0``.
        retain_ratio: share of the final training examples that are retention examples, in [0, 1). The
            ``num_examples`` SDD pairs are kept and ``round(num_examples * r / (1 - r))`` retention
            examples are added (see :mod:`sdd.datamodules.retention`). They are mixed in here, after the
            pair set is built, so they never enter the pair cache.
        **kwargs: batching and tokenization options of :class:`ConversationDataModule`.
    """

    def __init__(
        self,
        builder: SDDPairBuilder,
        answer_prefix: str | None = None,
        retain: dict[str, Any] | None = None,
        retain_ratio: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.builder = builder
        self.answer_prefix = answer_prefix or ""
        self.retention = retention_stream(retain, retain_ratio, self.seed)
        self.manifest: dict[str, Any] | None = None
        self._conversations: list[Conversation] | None = None

    def build_conversations(self) -> list[Conversation]:
        if self._conversations is None:
            pairs, self.manifest = self.builder.build()
            self._conversations = [
                instruction_answer(p["instruction"], self.answer_prefix + p["answer"]) for p in pairs
            ]
        return self._conversations

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.manifest is not None and "retention" in self.stats:
            # A copy: the pair cache's manifest describes the pairs alone and is never rewritten.
            self.manifest = {**self.manifest, "retention": self.stats["retention"]}
