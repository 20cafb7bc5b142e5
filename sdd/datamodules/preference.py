"""Preference pairs (a prompt with a chosen and a rejected answer) for SimPO-style objectives.

Both answers are formatted and masked by :func:`sdd.chat.tokenize_conversation`, exactly as every other
data set: a batch is ``{"chosen": batch, "rejected": batch}``, each a right-padded
``{"input_ids", "attention_mask", "labels"}`` with labels on the answer tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from sdd.chat import Conversation, TokenizedExample, instruction_answer, tokenize_conversation
from sdd.data.sources import DataSource
from sdd.datamodules.conversations import (
    ConversationDataModule,
    PadCollator,
    answer_token_count,
    has_answer_token,
)


@dataclass
class PreferencePair:
    chosen: TokenizedExample
    rejected: TokenizedExample

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated


class PairCollator:
    """Pads the chosen and the rejected sides of a batch of pairs separately."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad = PadCollator(pad_token_id)

    def __call__(self, pairs: Sequence[PreferencePair]) -> dict[str, dict[str, torch.Tensor]]:
        return {"chosen": self.pad([p.chosen for p in pairs]), "rejected": self.pad([p.rejected for p in pairs])}


class PreferenceDataModule(ConversationDataModule):
    """``(instruction, chosen answer, rejected answer)`` records as masked pairs.

    Args:
        source: a DataSource config with columns ``instruction`` and the two answer fields
            (``corpus.safety_pairs``: ``safe`` is chosen, ``unsafe`` is rejected).
        chosen_field, rejected_field: our column names of the preferred and dispreferred answers.
        Others as :class:`ConversationDataModule` (``num_examples`` counts pairs).
    """

    record_noun = "pairs"
    # An answer with no token left has no likelihood to compare.
    drop_reason = "an answer has no token left within"

    def __init__(
        self, source: dict[str, Any], chosen_field: str = "safe", rejected_field: str = "unsafe", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.source = DataSource.from_config(source, "data.source")
        self.chosen_field = chosen_field
        self.rejected_field = rejected_field
        self._pairs: list[tuple[Conversation, Conversation]] | None = None

    def build_records(self) -> list[tuple[Conversation, Conversation]]:
        """``(chosen, rejected)`` conversations, one per source record."""
        if self._pairs is None:
            records = self.load_source(self.source, required=["instruction", self.chosen_field, self.rejected_field])
            self._pairs = [
                (
                    instruction_answer(str(r["instruction"]), str(r[self.chosen_field]), self.system_prompt),
                    instruction_answer(str(r["instruction"]), str(r[self.rejected_field]), self.system_prompt),
                )
                for r in records
            ]
        return self._pairs

    def to_example(self, record: tuple[Conversation, Conversation]) -> PreferencePair:
        chosen, rejected = record
        return PreferencePair(
            tokenize_conversation(self.tokenizer, chosen, self.max_length, self.mask_prompt),
            tokenize_conversation(self.tokenizer, rejected, self.max_length, self.mask_prompt),
        )

    def is_trainable(self, example: PreferencePair) -> bool:
        return has_answer_token(example.chosen) and has_answer_token(example.rejected)

    def content_stats(self, examples: Sequence[PreferencePair]) -> dict[str, Any]:
        return {
            "chosen_answer_tokens": sum(answer_token_count(p.chosen) for p in examples),
            "rejected_answer_tokens": sum(answer_token_count(p.rejected) for p in examples),
        }

    def collate_fn(self) -> PairCollator:
        return PairCollator(self.tokenizer.pad_token_id)
