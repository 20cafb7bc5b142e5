"""Safety-recovery examples (DeepAlign's data augmentation): a harmful prompt, the first k tokens of a
harmful answer, then a refusal; the loss is on the refusal only.

Qi et al. (2024), "Safety Alignment Should Be Made More Than Just a Few Tokens Deep" (ICLR 2025),
§3.2: each triplet ``(x, h, r)`` (harmful instruction, harmful answer, refusal) gives the example
``x -> h_{<=k} ⊕ r``; the harmful prefix is context (masked), so the model learns to recover into a
refusal after any number of harmful tokens. The prefix length is drawn anew each time an example is
used: with probability ``augment_prob`` (1/2 in the authors' code) ``k ~ Uniform{1, ..., min(100,
|h|)}``, else ``k = 0`` (the plain refusal example).

Tokenization goes through :mod:`sdd.chat` once per record: ``x -> r`` and ``x -> h`` are tokenized as
conversations (same template, same prompt tokens); the example is assembled at the token level from
the prompt tokens, the first ``k`` tokens of the harmful answer and the refusal's assistant tokens
(refusal text plus end-of-turn marker), as the paper cuts "the first k tokens". The harmful answer's
own end-of-turn marker (the token suffix it shares with the refusal) is never part of a prefix.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

from torch.utils.data import Dataset

from sdd.chat import IGNORE_INDEX, ChatFormatError, TokenizedExample, instruction_answer, tokenize_conversation
from sdd.data.sources import DataSource
from sdd.datamodules.conversations import ConversationDataModule

_NO_LIMIT = 1 << 30  # tokenize whole; recovery examples are cut to max_length when assembled


@dataclass
class RecoveryTriplet:
    """Token pieces of one ``(harmful prompt, harmful answer, refusal)`` record."""

    prompt_ids: list[int]
    harmful_ids: list[int]  # the harmful answer's content tokens (no end-of-turn marker)
    refusal_ids: list[int]  # the refusal's assistant tokens, end-of-turn marker included
    max_prefix: int  # the largest k that still leaves a refusal token within max_length


@dataclass
class RecoveryExample(TokenizedExample):
    prefix_length: int = 0  # k: harmful answer tokens given as (masked) context


def _common_suffix_length(a: list[int], b: list[int]) -> int:
    length = 0
    while length < min(len(a), len(b)) and a[-1 - length] == b[-1 - length]:
        length += 1
    return length


def split_answer(tokenized: TokenizedExample) -> tuple[list[int], list[int]]:
    """Prompt tokens and assistant tokens of a tokenized single-turn conversation."""
    start = next(i for i, label in enumerate(tokenized.labels) if label != IGNORE_INDEX)
    return tokenized.input_ids[:start], tokenized.input_ids[start:]


class SafetyRecoveryDataset(Dataset):
    """Draws the harmful-prefix length of an example each time it is fetched (seeded, reproducible)."""

    def __init__(self, triplets: list[RecoveryTriplet], augment_prob: float, max_length: int, seed: int) -> None:
        self.triplets = triplets
        self.augment_prob = augment_prob
        self.max_length = max_length
        self.seed = seed
        self._draws = [0] * len(triplets)

    def __len__(self) -> int:
        return len(self.triplets)

    def __getitem__(self, index: int) -> RecoveryExample:
        rng = random.Random(f"{self.seed}:{index}:{self._draws[index]}")
        self._draws[index] += 1
        triplet = self.triplets[index]
        augment = triplet.max_prefix > 0 and rng.random() < self.augment_prob
        return self.assemble(triplet, rng.randint(1, triplet.max_prefix) if augment else 0)

    def assemble(self, triplet: RecoveryTriplet, prefix_length: int) -> RecoveryExample:
        """``prompt ⊕ h_{<=k} ⊕ refusal``, labels on the refusal tokens only."""
        context = triplet.prompt_ids + triplet.harmful_ids[:prefix_length]
        input_ids = (context + triplet.refusal_ids)[: self.max_length]
        labels = ([IGNORE_INDEX] * len(context) + triplet.refusal_ids)[: self.max_length]
        truncated = len(context) + len(triplet.refusal_ids) > self.max_length
        return RecoveryExample(input_ids, labels, truncated, prefix_length)


class SafetyRecoveryDataModule(ConversationDataModule):
    """DeepAlign's safety-recovery examples from ``(instruction, safe, unsafe)`` records.

    Args:
        source: a DataSource config with ``instruction`` and the two answer fields
            (``corpus.safety_pairs``).
        refusal_field, harmful_field: our column names of the refusal and of the harmful answer.
        augment_prob: probability that an example gets a harmful prefix (k >= 1); else k = 0.
        max_prefix_tokens: the largest k (100 in the paper).
        Others as :class:`ConversationDataModule` (``mask_prompt`` must stay true: the harmful
        prefix is context by definition).
    """

    record_noun = "triplets"
    drop_reason = "the prompt alone exceeds"

    def __init__(
        self,
        source: dict[str, Any],
        refusal_field: str = "safe",
        harmful_field: str = "unsafe",
        augment_prob: float = 0.5,
        max_prefix_tokens: int = 100,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= augment_prob <= 1.0:
            raise ValueError("data.augment_prob must be in [0, 1].")
        if max_prefix_tokens < 0:
            raise ValueError("data.max_prefix_tokens must be >= 0.")
        if not self.mask_prompt:
            raise ValueError("Safety-recovery examples mask the prompt and the harmful prefix: set mask_prompt=true.")
        self.source = DataSource.from_config(source, "data.source")
        self.refusal_field = refusal_field
        self.harmful_field = harmful_field
        self.augment_prob = augment_prob
        self.max_prefix_tokens = max_prefix_tokens
        self._records: list[dict[str, Any]] | None = None

    def build_records(self) -> list[dict[str, Any]]:
        """The ``(instruction, refusal, harmful answer)`` records of the source."""
        if self._records is None:
            self._records = self.load_source(
                self.source, required=["instruction", self.refusal_field, self.harmful_field]
            )
        return self._records

    def to_example(self, record: dict[str, Any]) -> RecoveryTriplet | None:
        """Tokenize one record through the chat path; None if not even the prompt fits."""
        instruction = str(record["instruction"])
        refusal = tokenize_conversation(
            self.tokenizer,
            instruction_answer(instruction, str(record[self.refusal_field]), self.system_prompt),
            _NO_LIMIT,
        )
        harmful = tokenize_conversation(
            self.tokenizer,
            instruction_answer(instruction, str(record[self.harmful_field]), self.system_prompt),
            _NO_LIMIT,
        )
        prompt_ids, refusal_ids = split_answer(refusal)
        harmful_prompt_ids, harmful_ids = split_answer(harmful)
        if harmful_prompt_ids != prompt_ids:
            raise ChatFormatError(
                "The chat template renders the same prompt differently depending on the answer, so a harmful "
                "prefix cannot be spliced before the refusal. Set backbone.chat_template to a plain template."
            )
        content = harmful_ids[: len(harmful_ids) - _common_suffix_length(harmful_ids, refusal_ids)]
        room = self.max_length - len(prompt_ids) - 1  # keep at least one refusal token
        if room < 0:
            return None
        return RecoveryTriplet(prompt_ids, content, refusal_ids, min(self.max_prefix_tokens, len(content), room))

    def is_trainable(self, example: RecoveryTriplet | None) -> bool:
        return example is not None

    def drop_stats(self, made: Sequence[RecoveryTriplet | None], dropped: int) -> dict[str, Any]:
        return {"dropped_prompt_too_long": dropped}

    def content_stats(self, examples: Sequence[RecoveryTriplet]) -> dict[str, Any]:
        return {
            "augment_prob": self.augment_prob,
            "mean_max_prefix_tokens": sum(t.max_prefix for t in examples) / len(examples),
            "refusal_tokens": sum(len(t.refusal_ids) for t in examples),
        }

    def make_dataset(self, examples: list[RecoveryTriplet]) -> SafetyRecoveryDataset:
        return SafetyRecoveryDataset(examples, self.augment_prob, self.max_length, self.seed)
