"""One loader for every data source: Hugging Face Hub data sets and local files.

A source is a small config node::

    harmful:
      hub_id: PKU-Alignment/BeaverTails   # used when `path` is null
      split: 30k_train                    # (hub_config, data_files: as datasets.load_dataset takes them)
      path: null                          # a local csv / json / jsonl / parquet file; wins over hub_id
      columns: {instruction: prompt, category: category}   # our name -> the source's column
      where: {is_safe: false}             # keep rows whose source columns equal these values
      partition: null                     # {part: train | heldout, key, heldout_fraction, seed}: sdd/data/splits.py
      limit: null

Column names may be dotted paths into nested values (``conversations.1`` is the second element of
the ``conversations`` list). Records come back as plain dicts keyed by our names. Files shipped in
the package are addressed as ``demo:<file name>``.

A row whose value of a column the caller requires is missing or empty (an empty CSV cell, a null, an
absent key, blank text, an empty list) is dropped, never turned into the text "None": the loader warns
with the source and the count, and the returned list carries the count (``records.dropped_missing``)
for the data statistics and manifests. When no row is left, that is an error naming the fix.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from sdd.errors import UserError

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).parent / "demo"
_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataSourceError(UserError, ValueError):
    """A data source is missing, malformed or unreachable; the message names the fix."""


@dataclass
class DataSource:
    """Where records come from and how their columns map to ours.

    Args:
        name: the config key to fix this source under (``corpus.harmful``), named in error messages.
    """

    name: str = "data"
    hub_id: str | None = None
    hub_config: str | None = None
    data_files: str | None = None
    split: str = "train"
    path: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    where: dict[str, Any] = field(default_factory=dict)
    partition: dict[str, Any] | None = None
    limit: int | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | "DataSource", name: str | None = None) -> "DataSource":
        if isinstance(config, DataSource):
            return config
        if config is None:
            raise DataSourceError(
                f"The data source {name or ''} is not set (null) in this corpus. Choose a corpus that has it "
                "(corpus=local paths.data_dir=<folder>, or corpus=hub) or point at a file: "
                "corpus.<source>.path=<file> (see conf/corpus/local.yaml for the expected columns)."
            )
        values = dict(config)
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise DataSourceError(
                f"Unknown key(s) {sorted(unknown)} in data source {name or values.get('name')}; "
                f"allowed: {sorted(cls.__dataclass_fields__)}."
            )
        if name is not None and "name" not in values:
            values["name"] = name
        values["columns"] = dict(values.get("columns") or {})
        values["where"] = dict(values.get("where") or {})
        values["partition"] = dict(values["partition"]) if values.get("partition") else None
        return cls(**values)

    def local_path(self) -> Path | None:
        if not self.path:
            return None
        if str(self.path).startswith("demo:"):
            return DEMO_DIR / str(self.path)[len("demo:") :]
        return Path(os.path.expanduser(str(self.path)))

    def fingerprint(self) -> str:
        """Identifies the source's content: the spec plus, for a local file, its size and content hash."""
        spec = json.dumps(
            {
                k: getattr(self, k)
                for k in ("hub_id", "hub_config", "data_files", "split", "columns", "where", "partition", "limit")
            },
            sort_keys=True,
            default=str,
        )
        local = self.local_path()
        if local is not None and local.exists():
            digest = hashlib.sha256(local.read_bytes()).hexdigest()
            spec += f"|{local.name}|{digest}"
        elif local is not None:
            spec += f"|{local}"
        return hashlib.sha256(spec.encode()).hexdigest()


class Records(list):
    """The records of a source (a plain list), with how many rows were dropped for missing values."""

    def __init__(self, records: Sequence[dict[str, Any]] = (), dropped_missing: int = 0) -> None:
        super().__init__(records)
        self.dropped_missing = dropped_missing


def load_records(
    source: DataSource | Mapping[str, Any], name: str | None = None, required: Sequence[str] = ()
) -> Records:
    """Load a source as a list of records keyed by our column names.

    Args:
        required: our column names the caller needs; a source that does not map one is an error, and a
            row whose value of one is missing or empty is dropped (counted in ``dropped_missing``).

    Raises:
        DataSourceError: missing, empty or non-UTF-8 file, unknown format, malformed file, missing
            column, a filter that leaves nothing, no row with all required values, or a Hub data set
            that cannot be reached.
    """
    source = DataSource.from_config(source, name)
    unmapped = [c for c in required if c not in source.columns]
    if unmapped:
        raise DataSourceError(
            f"{source.name}: no mapping for column(s) {unmapped}. Fix: {source.name}.columns.{unmapped[0]}="
            "<the column in your file>."
        )
    dataset = _load_dataset(source)
    missing_filters = [c for c in source.where if c not in dataset.column_names]
    if missing_filters:
        raise DataSourceError(
            f"{source.name}: filter column(s) {missing_filters} not in the data "
            f"(columns: {dataset.column_names}). Fix {source.name}.where."
        )
    rows = dataset.to_list()
    if source.where:
        rows = [row for row in rows if all(_equals(row[c], v) for c, v in source.where.items())]
        if not rows:
            raise DataSourceError(f"{source.name}: no row satisfies where={source.where}. Fix {source.name}.where.")
    records = [
        {ours: _lookup(row, theirs, source, dataset.column_names) for ours, theirs in source.columns.items()}
        for row in rows
    ]
    if not records:
        fix = f"{source.name}.path" if source.local_path() is not None else f"{source.name}.split / .limit"
        raise DataSourceError(f"{source.name}: the data set is empty ({_describe(source)}). Fix {fix}.")
    complete = [r for r in records if not any(is_missing(r[c]) for c in required)]
    dropped = len(records) - len(complete)
    if not complete:
        columns = ", ".join(f"'{source.columns[c]}'" for c in required)
        raise DataSourceError(
            f"{source.name}: no usable row: all {len(records)} rows have a missing or empty value in column(s) "
            f"{columns} ({_describe(source)}). Fill in those values, or map the right column with "
            f"{source.name}.columns.{required[0]}=<column>."
        )
    if dropped:
        log.warning(
            "%s: %d of %d rows dropped: a missing or empty value in %s (%s)",
            source.name,
            dropped,
            len(records),
            [source.columns[c] for c in required],
            _describe(source),
        )
    if source.partition:  # the train or held-out part only (sdd/data/splits.py)
        from sdd.data.splits import partition_records

        complete = partition_records(complete, source.partition, source.name)
    if source.limit is not None:
        complete = complete[: source.limit]
    return Records(complete, dropped_missing=dropped)


def is_missing(value: Any) -> bool:
    """True for an absent value: None, NaN, blank text, or an empty list or mapping."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (list, tuple, Mapping)):
        return len(value) == 0
    return False


def _describe(source: DataSource) -> str:
    local = source.local_path()
    return f"file {local}" if local is not None else f"Hub data set {source.hub_id} split {source.split}"


def _load_dataset(source: DataSource):
    import datasets

    local = source.local_path()
    if local is not None:
        if not local.exists():
            raise DataSourceError(f"{source.name}: file not found: {local}. Fix {source.name}.path.")
        builder = _FORMATS.get(local.suffix.lower())
        if builder is None:
            raise DataSourceError(
                f"{source.name}: cannot read '{local.suffix}' files ({local}); use one of {sorted(_FORMATS)}."
            )
        if builder != "parquet":
            _check_text_file(local, source)
        try:
            return datasets.load_dataset(builder, data_files=str(local), split="train")
        except Exception as error:  # datasets raises many types for a malformed file
            raise DataSourceError(
                f"{source.name}: could not parse {local} as {builder}: {error}. Fix the file (one JSON "
                "object per line for jsonl, a JSON list of objects for json, a header row for csv)."
            ) from error
    if not source.hub_id:
        raise DataSourceError(
            f"{source.name}: neither path nor hub_id is set (the demo corpus has no attack data). Set "
            f"{source.name}.path=<local file> (columns {sorted(source.columns.values())}), or choose a corpus "
            "that has it: corpus=local paths.data_dir=<folder>, or corpus=hub."
        )
    try:
        return datasets.load_dataset(source.hub_id, source.hub_config, data_files=source.data_files, split=source.split)
    except Exception as error:  # offline, gated, missing split ... all end the same way
        raise DataSourceError(
            f"{source.name}: could not load the Hub data set '{source.hub_id}' (split '{source.split}'): "
            f"{type(error).__name__}: {error}\nWithout Hub access, pass a local file instead: "
            f"{source.name}.path=/path/to/file.jsonl (csv, json, jsonl or parquet) with columns "
            f"{sorted(set(source.columns.values()) | set(source.where))}, or remap them with "
            f"{source.name}.columns.<ours>=<theirs>."
        ) from error


def _check_text_file(path: Path, source: DataSource) -> None:
    """Refuse an empty file or one that is not UTF-8, saying where the first bad byte is."""
    if not path.is_file():
        raise DataSourceError(f"{source.name}: {path} is not a file. Fix {source.name}.path.")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines, blank = 0, 0, True
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as error:
                position = offset + error.start
                line = lines + chunk[: error.start].count(b"\n") + 1
                with open(path, "rb") as again:
                    head = again.read(4)
                guess = (
                    "it starts with a UTF-16 byte-order mark"
                    if head[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
                    else "probably Latin-1 / Windows-1252"
                )
                encoding = "utf-16" if "UTF-16" in guess else "latin1"
                raise DataSourceError(
                    f"{source.name}: {path} is not UTF-8 text: byte 0x{chunk[error.start]:02x} at line {line} "
                    f"(offset {position}) is not valid UTF-8 ({guess}). Fix: save the file as UTF-8, e.g. "
                    f"iconv -f {encoding} -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}, and point "
                    f"{source.name}.path at it."
                ) from None
            blank = blank and not text.strip()
            lines += chunk.count(b"\n")
            offset += len(chunk)
    if blank:
        raise DataSourceError(
            f"{source.name}: {path} is empty. Fix {source.name}.path (a csv with a header row, or json / jsonl "
            f"records with columns {sorted(source.columns.values())})."
        )


def _lookup(row: Mapping[str, Any], dotted: str, source: DataSource, column_names: list[str]) -> Any:
    """The value at ``dotted`` in ``row``; None where a nested value is absent in this row (a missing
    value), an error where the top-level column does not exist at all."""
    value: Any = row
    for depth, part in enumerate(str(dotted).split(".")):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, (list, tuple)) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        elif depth > 0 and (value is None or isinstance(value, (list, tuple, Mapping))):
            return None  # this row's nested value is absent (a null, a shorter list, a key not in this row)
        else:
            raise DataSourceError(
                f"{source.name}: column '{dotted}' not found ({_describe(source)} has columns {column_names}). "
                f"Fix {source.name}.columns, e.g. {source.name}.columns.<ours>=<one of those>."
            )
    return value


def _equals(value: Any, wanted: Any) -> bool:
    if isinstance(value, str) and isinstance(wanted, bool):  # csv stores booleans as text
        return value.strip().lower() == str(wanted).lower()
    return value == wanted
