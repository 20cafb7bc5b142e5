"""The LightningDataModule shared by every supervised data set: conversations -> masked token batches.

Subclasses say only where records come from and how one becomes an example
(:meth:`ConversationDataModule.build_records`, :meth:`~ConversationDataModule.to_example`); the setup
(subset, retention, drops, split, statistics) is shared. Formatting and masking go through
:mod:`sdd.chat`, so defense and attack data are tokenized alike.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from sdd.chat import (
    IGNORE_INDEX,
    Conversation,
    PadCollator,
    TokenizedExample,
    instruction_answer,
    tokenize_conversation,
)
from sdd.data.sources import DataSource, DataSourceError, load_records
from sdd.datamodules.retention import RetentionStream, retention_stream

log = logging.getLogger(__name__)


def answer_token_count(example: TokenizedExample) -> int:
    """Tokens of ``example`` that carry a label (the answer tokens when the prompt is masked)."""
    return sum(label != IGNORE_INDEX for label in example.labels)


def has_answer_token(example: TokenizedExample) -> bool:
    """Whether any token of ``example`` carries a label."""
    return any(label != IGNORE_INDEX for label in example.labels)


class TokenizedDataset(Dataset):
    def __init__(self, examples: Sequence[TokenizedExample]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> TokenizedExample:
        return self.examples[index]


class ConversationDataModule(L.LightningDataModule):
    """Supervised fine-tuning data: conversations, loss on assistant tokens only.

    :meth:`setup` is the one setup of every data module (a template method): the records
    (:meth:`build_records`), a seeded subset of ``num_examples``, the retention stream mixed in, each
    record made an example (:meth:`to_example`), examples with nothing to train on dropped
    (:meth:`is_trainable`), a seeded validation split (:meth:`make_dataset`) and the statistics
    (:meth:`drop_stats`, :meth:`content_stats`). A subclass supplies how a record becomes an example
    and, where a batch is not a padded token batch, the collate function (:meth:`collate_fn`).

    Args:
        batch_size: examples per optimizer micro-step.
        max_length: tokens per example; longer ones are cut on the right.
        num_examples: keep a seeded random subset of this many records (null: all); the k of
            k-shot attacks.
        val_fraction: share of examples held out for ``val/loss``.
        system_prompt: a system message put before every conversation that has none.
        mask_prompt: loss on assistant tokens only (True) or on every token.
        num_workers: DataLoader workers.
        seed: the subset, shuffling and the validation split.
    """

    # What one record is, in the statistics (the key counting them) and in messages.
    record_noun = "conversations"
    # Why an example is dropped (followed by "max_length=<n>").
    drop_reason = "no answer token left within"

    def __init__(
        self,
        batch_size: int = 8,
        max_length: int = 512,
        num_examples: int | None = None,
        val_fraction: float = 0.0,
        system_prompt: str | None = None,
        mask_prompt: bool = True,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError("data.val_fraction must be in [0, 1).")
        self.batch_size = batch_size
        self.max_length = max_length
        self.num_examples = num_examples
        self.val_fraction = val_fraction
        self.system_prompt = system_prompt
        self.mask_prompt = mask_prompt
        self.num_workers = num_workers
        self.seed = seed
        self.tokenizer = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.stats: dict[str, Any] = {}
        # Benign retention examples mixed in after the num_examples subset (set by subclasses that offer it).
        self.retention: RetentionStream | None = None
        self.dropped_missing_values: dict[str, int] = {}  # source name -> rows without a required value

    def load_source(self, source: DataSource, required: Sequence[str]) -> list[dict[str, Any]]:
        """``load_records`` of ``source``, counting the rows dropped for a missing value in the stats."""
        records = load_records(source, required=required)
        self.dropped_missing_values[source.name] = records.dropped_missing
        return records

    def connect(self, tokenizer, max_length: int | None = None) -> None:
        """Hand over run-time objects the config cannot hold."""
        self.tokenizer = tokenizer
        if max_length is not None:
            self.max_length = max_length

    # --- What a subclass supplies -------------------------------------------------------------------

    def build_conversations(self) -> list[Conversation]:
        """The conversations of a conversation data set (built once and cached by the subclass)."""
        raise NotImplementedError

    def build_records(self) -> list[Any]:
        """All records, in source order, before the ``num_examples`` subset (default: the conversations)."""
        return self.build_conversations()

    def to_example(self, record: Any) -> Any:
        """One record (or retention conversation) as a training example (default: a masked conversation)."""
        if self.system_prompt and record[0]["role"] != "system":
            record = [{"role": "system", "content": self.system_prompt}, *record]
        return tokenize_conversation(self.tokenizer, record, self.max_length, self.mask_prompt)

    def is_trainable(self, example: Any) -> bool:
        """Whether an example keeps something to train on (default: an answer token within max_length)."""
        return has_answer_token(example)

    def drop_stats(self, made: Sequence[Any], dropped: int) -> dict[str, Any]:
        """Statistics of making the examples: ``made`` are all of them, ``dropped`` not trainable."""
        return {"truncated": sum(example.truncated for example in made), "dropped_no_answer": dropped}

    def content_stats(self, examples: Sequence[Any]) -> dict[str, Any]:
        """Statistics of the kept examples."""
        return {
            "answer_tokens": sum(answer_token_count(e) for e in examples),
            "tokens": sum(len(e.input_ids) for e in examples),
        }

    def make_dataset(self, examples: list[Any]) -> Dataset:
        """The Dataset of one split."""
        return TokenizedDataset(examples)

    def collate_fn(self) -> Callable[[Sequence[Any]], Any]:
        """Turns a list of examples into a batch (default: right-padded token tensors)."""
        return PadCollator(self.tokenizer.pad_token_id)

    # --- The one setup --------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        # Builds and caches data sets (e.g. SDD pairs) once, before any process tokenizes them.
        self.build_records()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.tokenizer is None:
            raise RuntimeError("Call datamodule.connect(tokenizer) before setup().")
        records = self.build_records()
        if self.num_examples is not None and self.num_examples < len(records):
            # A seeded random subset (k-shot selection for attacks); the same seed gives the same k.
            chosen = torch.randperm(len(records), generator=torch.Generator().manual_seed(self.seed))
            records = [records[i] for i in sorted(chosen[: self.num_examples].tolist())]
        retained = self.retention.draw(len(records)) if self.retention is not None else []
        is_retention = [False] * len(records) + [True] * len(retained)
        records = records + retained
        made = [self.to_example(record) for record in records]
        kept = [i for i, example in enumerate(made) if self.is_trainable(example)]
        examples = [made[i] for i in kept]
        dropped = len(made) - len(examples)
        if dropped:
            log.warning("%d %s dropped: %s max_length=%d", dropped, self.record_noun, self.drop_reason, self.max_length)
        if not examples:
            raise DataSourceError(
                f"No training example left: all {len(records)} {self.record_noun} dropped ({self.drop_reason} "
                f"max_length={self.max_length}). Raise data.max_length."
            )
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(self.seed)).tolist()
        num_val = int(len(examples) * self.val_fraction)
        self.val_set = self.make_dataset([examples[i] for i in order[:num_val]]) if num_val else None
        self.train_set = self.make_dataset([examples[i] for i in order[num_val:]])
        self.stats = {
            self.record_noun: len(records),
            "train_examples": len(self.train_set),
            "val_examples": num_val,
            **self.drop_stats(made, dropped),
            "dropped_missing_values": dict(self.dropped_missing_values),
            **self.content_stats(examples),
        }
        if self.retention is not None:
            kept_retention = [is_retention[i] for i in kept]
            self.stats["retention"] = {
                **self.retention.info,
                "train_examples": sum(kept_retention[i] for i in order[num_val:]),
                "val_examples": sum(kept_retention[i] for i in order[:num_val]),
            }
        log.info("%s: %s", type(self).__name__, self.stats)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            collate_fn=self.collate_fn(),
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, shuffle=False) if self.val_set else []


class InstructionAnswerDataModule(ConversationDataModule):
    """Single-turn pairs from one source with columns ``instruction`` and ``answer``.

    Used for safety alignment (harmful prompt -> safe refusal) and, with attack data, for malicious
    fine-tuning.

    Args:
        source: a :class:`sdd.data.sources.DataSource` config.
        answer_prefix: text put before every answer of ``source`` (never before retention answers).
        retain: a source of benign instructions with their own answers (columns ``instruction``,
            ``answer``) mixed in at ``retain_ratio``; read only when ``retain_ratio > 0``.
        retain_ratio: share of the final training examples that are retention examples, in [0, 1);
            the ``num_examples`` pairs of ``source`` are kept and
            ``round(num_examples * r / (1 - r))`` retention examples are added
            (:mod:`sdd.datamodules.retention`). 0, the default, is the papers' recipe: nothing mixed.
        jailbreak: a jailbreak format (:mod:`sdd.attacks.jailbreak`) applied to every pair of ``source``
            (jailbreak-tuning); null: the pairs as they are.
    """

    def __init__(
        self,
        source: dict[str, Any],
        answer_prefix: str | None = None,
        retain: dict[str, Any] | None = None,
        retain_ratio: float = 0.0,
        jailbreak: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        from sdd.attacks.jailbreak import JailbreakFormat  # imported here: sdd.attacks imports the training code

        super().__init__(**kwargs)
        self.source = DataSource.from_config(source, "data.source")
        self.jailbreak = None if jailbreak is None else JailbreakFormat.from_spec(jailbreak)
        self.answer_prefix = answer_prefix or ""
        self.retention = retention_stream(retain, retain_ratio, self.seed)
        self._conversations: list[Conversation] | None = None

    def build_conversations(self) -> list[Conversation]:
        from sdd.attacks.jailbreak import format_example

        if self._conversations is None:
            records = self.load_source(self.source, required=["instruction", "answer"])
            self._conversations = [  # jailbreak-tuning: each pair in the jailbreak format (None: unchanged)
                instruction_answer(
                    *format_example(str(r["instruction"]), self.answer_prefix + str(r["answer"]), self.jailbreak)
                )
                for r in records
            ]
        return self._conversations


# ShareGPT names roles by speaker; these are the names seen in public dumps.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class MultiTurnDataModule(ConversationDataModule):
    """Multi-turn conversations (ShareGPT format), loss on every assistant turn.

    Args:
        source: a DataSource config whose ``conversations`` column is a list of
            ``{role_key: speaker, content_key: text}`` turns.
        role_key, content_key: the turn fields (ShareGPT: ``from`` / ``value``).
        roles: speaker name -> ``user`` | ``assistant`` | ``system``.
        max_turns: keep at most this many turns per conversation (cut after an assistant turn).
    """

    def __init__(
        self,
        source: dict[str, Any],
        role_key: str = "from",
        content_key: str = "value",
        roles: dict[str, str] | None = None,
        max_turns: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.source = DataSource.from_config(source, "data.source")
        self.role_key = role_key
        self.content_key = content_key
        self.roles = dict(roles or SHAREGPT_ROLES)
        self.max_turns = max_turns
        self._conversations: list[Conversation] | None = None
        self.skipped = 0

    def build_conversations(self) -> list[Conversation]:
        if self._conversations is None:
            records = self.load_source(self.source, required=["conversations"])
            conversations = [self._convert(r["conversations"]) for r in records]
            self._conversations = [c for c in conversations if c]
            self.skipped = len(conversations) - len(self._conversations)
            if self.skipped:
                log.warning(
                    "%s: %d conversations skipped (no user -> assistant exchange)", self.source.name, self.skipped
                )
            if not self._conversations:
                raise DataSourceError(f"{self.source.name}: no usable conversation (check data.roles).")
        return self._conversations

    def _convert(self, turns: Any) -> Conversation:
        """Map roles, drop empty turns, merge consecutive turns of one speaker, end on an answer."""
        messages: Conversation = []
        for turn in turns or []:
            if not isinstance(turn, dict) or self.role_key not in turn or self.content_key not in turn:
                raise DataSourceError(
                    f"{self.source.name}: a turn lacks '{self.role_key}' / '{self.content_key}' ({turn!r:.80}). "
                    "Fix data.role_key / data.content_key."
                )
            role = self.roles.get(str(turn[self.role_key]).lower())
            text = str(turn[self.content_key] or "").strip()
            if role is None or not text:
                continue
            if messages and messages[-1]["role"] == role:
                messages[-1] = {"role": role, "content": messages[-1]["content"] + "\n\n" + text}
            else:
                messages.append({"role": role, "content": text})
        while messages and messages[0]["role"] == "assistant":  # a conversation opens with the user
            messages.pop(0)
        if self.max_turns is not None:
            messages = messages[: self.max_turns]
        while messages and messages[-1]["role"] != "assistant":
            messages.pop()
        return messages if any(m["role"] == "user" for m in messages) else []
