"""Preference pairs (a prompt with a chosen and a rejected answer) for SimPO-style objectives.

Both answers are formatted and masked by :func:`sdd.chat.tokenize_conversation`, exactly as every other
data set: a batch is ``{"chosen": batch, "rejected": batch}``, each a right-padded
``{"input_ids", "attention_mask", "labels"}`` with labels on the answer tokens only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader

from sdd.chat import IGNORE_INDEX, Conversation, TokenizedExample, instruction_answer, tokenize_conversation
from sdd.data.sources import DataSource, DataSourceError
from sdd.datamodules.conversations import ConversationDataModule, PadCollator, TokenizedDataset

log = logging.getLogger(__name__)


@dataclass
class PreferencePair:
    chosen: TokenizedExample
    rejected: TokenizedExample


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

    def __init__(
        self, source: dict[str, Any], chosen_field: str = "safe", rejected_field: str = "unsafe", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.source = DataSource.from_config(source, "data.source")
        self.chosen_field = chosen_field
        self.rejected_field = rejected_field
        self._pairs: list[tuple[Conversation, Conversation]] | None = None

    def build_pairs(self) -> list[tuple[Conversation, Conversation]]:
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

    def build_conversations(self) -> list[Conversation]:
        return [chosen for chosen, _ in self.build_pairs()]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.tokenizer is None:
            raise RuntimeError("Call datamodule.connect(tokenizer) before setup().")
        pairs = self.build_pairs()
        if self.num_examples is not None and self.num_examples < len(pairs):
            chosen = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(self.seed))
            pairs = [pairs[i] for i in sorted(chosen[: self.num_examples].tolist())]
        examples, dropped, truncated = [], 0, 0
        for chosen_conversation, rejected_conversation in pairs:
            pair = PreferencePair(
                tokenize_conversation(self.tokenizer, chosen_conversation, self.max_length, self.mask_prompt),
                tokenize_conversation(self.tokenizer, rejected_conversation, self.max_length, self.mask_prompt),
            )
            truncated += pair.chosen.truncated or pair.rejected.truncated
            if any(all(label == IGNORE_INDEX for label in side.labels) for side in (pair.chosen, pair.rejected)):
                dropped += 1  # an answer with no token left has no likelihood to compare
                continue
            examples.append(pair)
        if dropped:
            log.warning("%d pairs dropped: an answer has no token left within max_length=%d", dropped, self.max_length)
        if not examples:
            raise DataSourceError(
                f"No preference pair left out of {len(pairs)}: the answers do not fit in "
                f"max_length={self.max_length}. Raise data.max_length."
            )
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(self.seed)).tolist()
        num_val = int(len(examples) * self.val_fraction)
        self.val_set = TokenizedDataset([examples[i] for i in order[:num_val]]) if num_val else None
        self.train_set = TokenizedDataset([examples[i] for i in order[num_val:]])

        def answer_tokens(side: TokenizedExample) -> int:
            return sum(label != IGNORE_INDEX for label in side.labels)

        self.stats = {
            "pairs": len(pairs),
            "train_examples": len(self.train_set),
            "val_examples": num_val,
            "truncated": truncated,
            "dropped_no_answer": dropped,
            "dropped_missing_values": dict(self.dropped_missing_values),
            "chosen_answer_tokens": sum(answer_tokens(p.chosen) for p in examples),
            "rejected_answer_tokens": sum(answer_tokens(p.rejected) for p in examples),
        }
        log.info("Preference data: %s", self.stats)

    def _loader(self, dataset: TokenizedDataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            collate_fn=PairCollator(self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
        )
