"""Retention mixing: benign instructions with their own answers, mixed into a defense's training set.

Trained on harmful prompts alone, a small backbone generalises the defense's behaviour (refusing, or
answering off-topic) to every prompt. A retention stream counters that: benign instructions paired with
their own reference answers (``data.retain``, ``corpus.benign`` by default) are mixed into the training
set of ``safety_align``, ``sdd`` and ``sdd_reject``, tokenized through the same chat path.

What ``data.retain_ratio`` means: the share of the final training examples that are retention
examples. The defense's own examples stay as configured (``data.num_examples``, or the whole source when
it has fewer), and retention examples are added on top::

    n_retain = round(n_defense * r / (1 - r)),   0 <= r < 1
    (r = 0.1, 0.25, 0.5 add 1/9, 1/3 and 1 times n_defense)

``r = 0`` is the default and the papers' recipe (SDD trains on the harmful pairs alone): no retention
source is loaded and the data are exactly those without retention. The ratio is counted on the
conversations built (training plus validation split, before tokenization); the data module's
``stats["retention"]`` reports the counts that reached each split.

Retention examples are drawn under a seed, without replacement while the source has enough usable
records (a missing or blank instruction or answer makes a record unusable), otherwise every record is
used equally often (the remainder drawn without replacement) and a warning says so. They never get the
defense's answer prefix (SDD_reject's refusal statement) and never enter the SDD pair cache: they are
mixed in by the data module, after the defense's own set is built.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np

from sdd.chat import Conversation, instruction_answer
from sdd.data.sources import DataSource, DataSourceError, load_records

log = logging.getLogger(__name__)

RATIO_KEY = "data.retain_ratio"
SOURCE_KEY = "data.retain"
# Mixed into the seed so the retention draw is independent of the data module's other seeded draws.
_STREAM_ID = 0x7265_7461


def check_retain_ratio(ratio: Any) -> float:
    """``ratio`` as a float in [0, 1), or a :class:`ValueError` naming ``data.retain_ratio``."""
    valid = isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0.0 <= float(ratio) < 1.0
    if not valid:
        raise ValueError(
            f"{RATIO_KEY} must be a number in [0, 1): the share of the training examples that are benign "
            f"retention examples; got {ratio!r}. Fix: {RATIO_KEY}=0.25 (or 0, the papers' recipe, for none)."
        )
    return float(ratio)


def retention_count(num_defense: int, ratio: float) -> int:
    """Retention examples to add to ``num_defense`` defense examples so they make up ``ratio`` of the total.

    Args:
        num_defense: the defense's own training examples (kept as they are).
        ratio: the share of the final examples that are retention examples, in [0, 1).

    Returns:
        ``round(num_defense * ratio / (1 - ratio))`` (Python's round: halves go to the even number).
    """
    ratio = check_retain_ratio(ratio)
    if num_defense < 0:
        raise ValueError(f"num_defense must be >= 0, got {num_defense}")
    return int(round(num_defense * ratio / (1.0 - ratio)))


def draw_indices(pool_size: int, count: int, seed: int) -> np.ndarray:
    """``count`` indices into a pool of ``pool_size``, seeded.

    Without replacement when ``count <= pool_size``; otherwise every index ``count // pool_size`` times
    plus a without-replacement draw of the remainder, so no record is used more than once more than any
    other.
    """
    rng = np.random.default_rng([seed, _STREAM_ID])
    repeats, remainder = divmod(count, pool_size)
    return np.concatenate([np.tile(np.arange(pool_size), repeats), rng.permutation(pool_size)[:remainder]])


class RetentionStream:
    """Benign instruction -> own answer conversations, drawn to make up ``ratio`` of a training set.

    Args:
        source: a :class:`sdd.data.sources.DataSource` config with columns ``instruction`` and
            ``answer`` (``corpus.benign`` by default); only read when ``ratio > 0``.
        ratio: share of the final training examples that are retention examples, in [0, 1); 0 (the
            default, the papers' recipe) mixes nothing and loads nothing.
        seed: seeds the draw.

    Raises:
        ValueError: ``ratio`` outside [0, 1).
        DataSourceError: ``ratio > 0`` with no source, or a source without usable records.
    """

    def __init__(self, source: Mapping[str, Any] | DataSource | None, ratio: float = 0.0, seed: int = 0) -> None:
        self.ratio = check_retain_ratio(ratio)
        self.seed = seed
        self.source: DataSource | None = None
        if self.ratio > 0:
            if source is None:
                raise DataSourceError(
                    f"{RATIO_KEY}={self.ratio} needs a retention source, but {SOURCE_KEY} is null. Fix: "
                    f"{SOURCE_KEY}=${{corpus.benign}}, or a source with columns instruction and answer "
                    f"({SOURCE_KEY}.path=<file> {SOURCE_KEY}.columns.instruction=<col> "
                    f"{SOURCE_KEY}.columns.answer=<col>), or {RATIO_KEY}=0."
                )
            self.source = DataSource.from_config(source, SOURCE_KEY)
        self._records: list[dict[str, str]] | None = None
        self.dropped_unusable = 0
        self.drawn: list[Conversation] = []
        self.info: dict[str, Any] = {"ratio": self.ratio, "examples": 0, "source": None}

    @property
    def enabled(self) -> bool:
        return self.ratio > 0

    def records(self) -> list[dict[str, str]]:
        """The source's usable records (instruction and answer present and not blank), loaded once."""
        if self._records is None:
            if self.source is None:
                raise RuntimeError("No retention source: retain_ratio is 0.")
            # The shared loader drops (and counts) rows whose instruction or answer is missing or blank,
            # and raises when none is left.
            loaded = load_records(self.source, required=["instruction", "answer"])
            self._records = [{"instruction": str(r["instruction"]), "answer": str(r["answer"])} for r in loaded]
            self.dropped_unusable = loaded.dropped_missing
        return self._records

    def draw(self, num_defense: int) -> list[Conversation]:
        """The retention conversations to mix with ``num_defense`` defense conversations.

        Also sets :attr:`drawn` and :attr:`info` (ratio, examples, source, usable records, repeats).
        """
        count = retention_count(num_defense, self.ratio)
        if count == 0:
            self.drawn = []
            self.info = {"ratio": self.ratio, "examples": 0, "source": self.source.name if self.source else None}
            return []
        records = self.records()
        indices = draw_indices(len(records), count, self.seed)
        max_uses = -(-count // len(records))
        if max_uses > 1:
            log.warning(
                "%s has %d usable records for %d retention examples (%s=%s): each record is used %d or %d "
                "times. Use a larger retention source to avoid repeats.",
                self.source.name,
                len(records),
                count,
                RATIO_KEY,
                self.ratio,
                count // len(records),
                max_uses,
            )
        self.drawn = [instruction_answer(records[i]["instruction"], records[i]["answer"]) for i in indices]
        self.info = {
            "ratio": self.ratio,
            "examples": count,
            "source": self.source.name,
            "source_path": self.source.path or self.source.hub_id,
            "usable_records": len(records),
            "dropped_unusable_records": self.dropped_unusable,
            "max_uses_per_record": max_uses,
        }
        return list(self.drawn)


def retention_stream(source: Mapping[str, Any] | None, ratio: Any, seed: int) -> RetentionStream | None:
    """The stream a data module mixes in, or None when neither a source nor a ratio is configured
    (e.g. attack data, which have no ``retain`` keys: their stats then carry no retention entry)."""
    if source is None and ratio == 0:
        return None
    return RetentionStream(source, ratio, seed)
