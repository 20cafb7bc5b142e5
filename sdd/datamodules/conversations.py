"""The LightningDataModule shared by every supervised data set: conversations -> masked token batches.

Subclasses say only where conversations come from (:meth:`ConversationDataModule.build_conversations`);
formatting and masking go through :mod:`sdd.chat`, so defense and attack data are tokenized alike.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from sdd.chat import IGNORE_INDEX, Conversation, TokenizedExample, instruction_answer, tokenize_conversation
from sdd.data.sources import DataSource, DataSourceError, load_records
from sdd.datamodules.retention import RetentionStream, retention_stream

log = logging.getLogger(__name__)


class TokenizedDataset(Dataset):
    def __init__(self, examples: Sequence[TokenizedExample]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> TokenizedExample:
        return self.examples[index]


class PadCollator:
    """Right-pads a batch: ``input_ids`` with the pad id, ``labels`` with ``ignore_index``."""

    def __init__(self, pad_token_id: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.pad_token_id = pad_token_id
        self.ignore_index = ignore_index

    def __call__(self, examples: Sequence[TokenizedExample]) -> dict[str, torch.Tensor]:
        width = max(len(e.input_ids) for e in examples)
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), self.ignore_index, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            length = len(example.input_ids)
            input_ids[row, :length] = torch.tensor(example.input_ids)
            labels[row, :length] = torch.tensor(example.labels)
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class ConversationDataModule(L.LightningDataModule):
    """Supervised fine-tuning data: conversations, loss on assistant tokens only.

    Args:
        batch_size: examples per optimizer micro-step.
        max_length: tokens per example; longer ones are cut on the right.
        num_examples: keep a seeded random subset of this many conversations (null: all); the k of
            k-shot attacks.
        val_fraction: share of conversations held out for ``val/loss``.
        system_prompt: a system message put before every conversation that has none.
        mask_prompt: loss on assistant tokens only (True) or on every token.
        num_workers: DataLoader workers.
        seed: shuffling and the validation split.
    """

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
        self.train_set: TokenizedDataset | None = None
        self.val_set: TokenizedDataset | None = None
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

    def build_conversations(self) -> list[Conversation]:
        raise NotImplementedError

    def prepare_data(self) -> None:
        # Builds and caches data sets (e.g. SDD pairs) once, before any process tokenizes them.
        self.build_conversations()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.tokenizer is None:
            raise RuntimeError("Call datamodule.connect(tokenizer) before setup().")
        conversations = self.build_conversations()
        if self.num_examples is not None and self.num_examples < len(conversations):
            # A seeded random subset (k-shot selection for attacks); the same seed gives the same k.
            chosen = torch.randperm(len(conversations), generator=torch.Generator().manual_seed(self.seed))
            conversations = [conversations[i] for i in sorted(chosen[: self.num_examples].tolist())]
        retained = self.retention.draw(len(conversations)) if self.retention is not None else []
        is_retention = [False] * len(conversations) + [True] * len(retained)
        conversations = conversations + retained
        if self.system_prompt:
            conversations = [
                c if c[0]["role"] == "system" else [{"role": "system", "content": self.system_prompt}, *c]
                for c in conversations
            ]
        examples, kept_retention, no_answer_left, truncated = [], [], 0, 0
        for conversation, retention in zip(conversations, is_retention):
            example = tokenize_conversation(self.tokenizer, conversation, self.max_length, self.mask_prompt)
            truncated += example.truncated
            if all(label == IGNORE_INDEX for label in example.labels):
                no_answer_left += 1
                continue
            examples.append(example)
            kept_retention.append(retention)
        if no_answer_left:
            log.warning("%d conversations dropped: no answer token left within max_length=%d",
                        no_answer_left, self.max_length)
        if not examples:
            raise DataSourceError(
                f"No training example left: all {len(conversations)} conversations lose their answer at "
                f"max_length={self.max_length}. Raise data.max_length."
            )
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(examples), generator=generator).tolist()
        num_val = int(len(examples) * self.val_fraction)
        self.val_set = TokenizedDataset([examples[i] for i in order[:num_val]]) if num_val else None
        self.train_set = TokenizedDataset([examples[i] for i in order[num_val:]])
        self.stats = {
            "conversations": len(conversations),
            "train_examples": len(self.train_set),
            "val_examples": num_val,
            "truncated": truncated,
            "dropped_no_answer": no_answer_left,
            "dropped_missing_values": dict(self.dropped_missing_values),
            "answer_tokens": sum(sum(l != IGNORE_INDEX for l in e.labels) for e in examples),
            "tokens": sum(len(e.input_ids) for e in examples),
        }
        if self.retention is not None:
            self.stats["retention"] = {
                **self.retention.info,
                "train_examples": sum(kept_retention[i] for i in order[num_val:]),
                "val_examples": sum(kept_retention[i] for i in order[:num_val]),
            }
        log.info("Data: %s", self.stats)

    def _loader(self, dataset: TokenizedDataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            collate_fn=PadCollator(self.tokenizer.pad_token_id),
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
                instruction_answer(*format_example(str(r["instruction"]), self.answer_prefix + str(r["answer"]),
                                                   self.jailbreak))
                for r in records
            ]
        return self._conversations


# ShareGPT names roles by speaker; these are the names seen in public dumps.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "assistant": "assistant", "system": "system"}


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
                log.warning("%s: %d conversations skipped (no user -> assistant exchange)", self.source.name, self.skipped)
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
