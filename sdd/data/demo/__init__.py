"""Demo corpus written by the sdd developers (see README.md here): requests only, never harmful answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

DEMO_DIR = Path(__file__).parent
HARMFUL_INSTRUCTIONS = DEMO_DIR / "harmful_instructions.jsonl"
BENIGN_QA = DEMO_DIR / "benign_qa.jsonl"


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def demo_texts() -> Iterator[str]:
    """Every text of the demo corpus (to train the tiny backbone's tokenizer)."""
    for row in read_jsonl(HARMFUL_INSTRUCTIONS):
        yield row["instruction"]
        yield row["refusal"]
    for row in read_jsonl(BENIGN_QA):
        yield row["instruction"]
        yield row["answer"]
