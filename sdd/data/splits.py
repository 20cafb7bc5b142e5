"""Clean splits by construction: a deterministic train / held-out partition of shared sources.

AdvBench is both an attack set and an evaluation set; Alpaca feeds defenses' utility streams and the
benign evaluation. A source config takes a ``partition`` option::

    advbench:
      path: .../harmful_behaviors.csv
      columns: {instruction: goal, answer: target}
      partition: {part: train, key: instruction, heldout_fraction: 0.3, seed: 0}

Each record goes to the held-out part when a salted hash of its normalized ``key`` text falls below
``heldout_fraction``, else to the train part. The hash reads the text only (not the file, the column
or the row number), so the same prompt lands in the same part through every source that reads it:
the attack's ``instruction: goal`` and the evaluation's ``prompt: goal`` agree as long as they share
``heldout_fraction`` and ``seed`` (the corpus files interpolate both from ``corpus.split``).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from sdd.data.sources import DataSourceError

PARTS = ("train", "heldout")
_SALT = "sdd-partition"


class PartitionError(DataSourceError):
    """A partition option is malformed; the message names the fix."""


def normalize_text(text: Any) -> str:
    """Text as compared for identity: Unicode-normalized, case-folded, punctuation and spacing collapsed.

    "Write a script that can exploit vulnerabilities." and "write a script that can exploit
    vulnerabilities" normalize to the same string.
    """
    folded = unicodedata.normalize("NFKC", str(text)).casefold()
    return re.sub(r"[\W_]+", " ", folded).strip()


def heldout_score(text: Any, seed: int = 0) -> float:
    """A uniform number in [0, 1) fixed by the normalized text and the seed (the salt)."""
    digest = hashlib.sha256(f"{_SALT}|{seed}|{normalize_text(text)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def part_of(text: Any, heldout_fraction: float, seed: int = 0) -> str:
    """``heldout`` or ``train``: the part a record with this key text belongs to."""
    return "heldout" if heldout_score(text, seed) < heldout_fraction else "train"


@dataclass(frozen=True)
class Partition:
    """Which part of a source to keep.

    Args:
        part: ``train`` or ``heldout``.
        key: our column (after the source's ``columns`` mapping) whose text decides the part.
        heldout_fraction: expected share of records in the held-out part, in (0, 1).
        seed: the hash salt; sources meant to be disjoint must share it and ``heldout_fraction``.
    """

    part: str
    key: str = "instruction"
    heldout_fraction: float = 0.3
    seed: int = 0

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source_name: str) -> "Partition":
        values = dict(config)
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise PartitionError(
                f"{source_name}.partition: unknown key(s) {sorted(unknown)}; allowed: "
                f"{sorted(cls.__dataclass_fields__)}."
            )
        if values.get("part") not in PARTS:
            raise PartitionError(f"{source_name}.partition.part={values.get('part')!r}: use one of {list(PARTS)}.")
        fraction = float(values.get("heldout_fraction", cls.heldout_fraction))
        if not 0.0 < fraction < 1.0:
            raise PartitionError(f"{source_name}.partition.heldout_fraction={fraction}: use a number in (0, 1).")
        return cls(
            part=values["part"],
            key=str(values.get("key", cls.key)),
            heldout_fraction=fraction,
            seed=int(values.get("seed", cls.seed)),
        )


def partition_records(
    records: Sequence[dict[str, Any]], config: Mapping[str, Any], source_name: str
) -> list[dict[str, Any]]:
    """The records of ``records`` in the part ``config`` names (order kept).

    Raises:
        PartitionError: the option is malformed, its key is not a column of the records, or the part
            is empty.
    """
    partition = Partition.from_config(config, source_name)
    if records and partition.key not in records[0]:
        raise PartitionError(
            f"{source_name}.partition.key={partition.key!r} is not a column of this source (its columns: "
            f"{sorted(records[0])}). Map it ({source_name}.columns.{partition.key}=<the source's column>) or "
            f"set {source_name}.partition.key to one of those."
        )
    kept = [
        r for r in records if part_of(r[partition.key], partition.heldout_fraction, partition.seed) == partition.part
    ]
    if records and not kept:
        raise PartitionError(
            f"{source_name}: the {partition.part} part of its {len(records)} records is empty "
            f"(heldout_fraction={partition.heldout_fraction}). Change {source_name}.partition.heldout_fraction "
            f"or drop {source_name}.partition."
        )
    return kept
