"""Document normalizers for the ``sdd_*_local`` lm-eval tasks (referenced as ``!function utils.*``).

Each ``process_<task>`` maps a ``datasets.Dataset`` read from a local file to the column layout of
the matching Hugging Face Hub dataset, so the YAML prompts can stay identical to lm-eval's stock
tasks. They also undo what flat formats do to nested columns: a CSV cell holds a list or a dict as
JSON (or Python-literal) text, and a label may be a letter or a digit string instead of an int.

``normalize_<task>`` works on one row; :mod:`sdd.evaluation.capability` runs it on the first row to
fail fast with a clear message before the harness starts.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any, Callable

LETTERS = "ABCDEFGHIJ"


def _decode(value: Any, field: str) -> Any:
    """A list/dict stored as text (CSV cells) back to Python; other values unchanged."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not text or text[0] not in "[{":
        return value
    try:
        return json.loads(text)
    except ValueError:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError) as err:
            raise ValueError(f"column {field!r}: cannot parse {value[:80]!r} as a list or dict") from err


def _string_list(value: Any, field: str) -> list[str]:
    value = _decode(value, field)
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"column {field!r} must be a non-empty list of strings, got {value!r:.80}")
    return [str(v) for v in value]


def _label_dict(value: Any, field: str, keys: tuple[str, str]) -> dict[str, list]:
    value = _decode(value, field)
    if not isinstance(value, dict) or any(k not in value for k in keys):
        raise ValueError(f"column {field!r} must be a dict with keys {list(keys)}, got {value!r:.80}")
    first, second = (list(value[k]) for k in keys)
    if len(first) != len(second) or not first:
        raise ValueError(f"column {field!r}: {keys[0]} and {keys[1]} must be non-empty lists of equal length")
    return {keys[0]: first, keys[1]: second}


def _index(value: Any, field: str, num_choices: int) -> int:
    """An answer index from an int, a digit string ("2") or a letter ("C")."""
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            value = int(text)
        elif len(text) == 1 and text.upper() in LETTERS:
            value = LETTERS.index(text.upper())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_choices:
        raise ValueError(f"column {field!r} must be an index in [0, {num_choices - 1}] (or a letter), got {value!r}")
    return value


# --------------------------------------------------------------------------- one row


def normalize_mmlu(doc: dict) -> dict:
    """cais/mmlu: question, choices (4 strings), answer (0-3 or A-D), optional subject."""
    choices = _string_list(doc["choices"], "choices")
    if len(choices) != 4:
        raise ValueError(f"column 'choices' must hold exactly 4 options (MMLU prompt A-D), got {len(choices)}")
    return {
        "question": str(doc["question"]),
        "choices": choices,
        "answer": _index(doc["answer"], "answer", 4),
        # The YAML description tests `subject`; lm-eval renders with StrictUndefined, so it must exist.
        "subject": str(doc.get("subject") or ""),
    }


def _normalize_labelled(doc: dict, question_field: str) -> dict:
    choices = _label_dict(doc["choices"], "choices", ("text", "label"))
    choices = {"text": [str(t) for t in choices["text"]], "label": [str(lb).strip() for lb in choices["label"]]}
    answer_key = str(doc["answerKey"]).strip()
    if answer_key not in choices["label"]:
        raise ValueError(f"answerKey {answer_key!r} is not one of choices.label {choices['label']}")
    return {question_field: str(doc[question_field]), "choices": choices, "answerKey": answer_key}


def normalize_openbookqa(doc: dict) -> dict:
    """allenai/openbookqa (main): question_stem, choices {text, label}, answerKey."""
    return _normalize_labelled(doc, "question_stem")


def normalize_arc(doc: dict) -> dict:
    """allenai/ai2_arc: question, choices {text, label}, answerKey."""
    return _normalize_labelled(doc, "question")


def _hellaswag_preprocess(text: str) -> str:
    # Same cleanup as lm-eval's stock hellaswag task (WikiHow "[title]"/bracket artifacts).
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def normalize_hellaswag(doc: dict) -> dict:
    """Rowan/hellaswag: ctx, endings, label (+ activity_label, ctx_a, ctx_b when present).

    Builds ``query``/``choices``/``gold`` like lm-eval's stock task. With ``ctx_a``/``ctx_b`` the query
    is exactly the stock one; with only ``ctx`` it is the same text minus the capitalization of ctx_b.
    """
    endings = _string_list(doc["endings"], "endings")
    if doc.get("ctx_a") is not None and doc.get("ctx_b") is not None:
        ctx = doc["ctx_a"] + " " + str(doc["ctx_b"]).capitalize()
    else:
        ctx = str(doc["ctx"])
    label = doc.get("activity_label")
    query = f"{label}: {ctx}" if label else ctx
    return {
        "query": _hellaswag_preprocess(query),
        "choices": [_hellaswag_preprocess(e) for e in endings],
        "gold": _index(doc["label"], "label", len(endings)),
    }


def normalize_truthfulqa_mc1(doc: dict) -> dict:
    """truthful_qa (multiple_choice): question, mc1_targets {choices, labels} with exactly one label 1."""
    targets = _label_dict(doc["mc1_targets"], "mc1_targets", ("choices", "labels"))
    labels = [int(lb) for lb in targets["labels"]]
    if labels.count(1) != 1:
        raise ValueError(f"mc1_targets.labels must contain exactly one 1, got {labels}")
    return {
        "question": str(doc["question"]),
        "mc1_targets": {"choices": [str(c) for c in targets["choices"]], "labels": labels},
    }


NORMALIZERS: dict[str, Callable[[dict], dict]] = {
    "mmlu": normalize_mmlu,
    "openbookqa": normalize_openbookqa,
    "arc_challenge": normalize_arc,
    "arc_easy": normalize_arc,
    "hellaswag": normalize_hellaswag,
    "truthfulqa_mc1": normalize_truthfulqa_mc1,
}


# --------------------------------------------------------------------------- whole dataset (YAML hooks)


def _features(name: str):
    """The normalized columns' types, given to ``map`` explicitly.

    Without them ``datasets`` keeps a replaced column's old type (a CSV ``answerKey`` read as int64
    would turn our "2" back into 2) instead of the normalized one.
    """
    from datasets import Features, Sequence, Value

    text, texts = Value("string"), Sequence(Value("string"))
    return Features(
        {
            "mmlu": {"question": text, "choices": texts, "answer": Value("int64"), "subject": text},
            "openbookqa": {"question_stem": text, "choices": {"text": texts, "label": texts}, "answerKey": text},
            "arc_challenge": {"question": text, "choices": {"text": texts, "label": texts}, "answerKey": text},
            "arc_easy": {"question": text, "choices": {"text": texts, "label": texts}, "answerKey": text},
            "hellaswag": {"query": text, "choices": texts, "gold": Value("int64")},
            "truthfulqa_mc1": {"question": text, "mc1_targets": {"choices": texts, "labels": Sequence(Value("int64"))}},
        }[name]
    )


def _process(dataset, name: str):
    # Only the normalized columns are kept: the prompt needs nothing else, and stray columns of
    # odd types would only bloat the logged docs.
    return dataset.map(NORMALIZERS[name], remove_columns=dataset.column_names, features=_features(name))


def process_mmlu(dataset):
    return _process(dataset, "mmlu")


def process_openbookqa(dataset):
    return _process(dataset, "openbookqa")


def process_arc(dataset):
    """ARC-Challenge and ARC-Easy: the same layout and normalizer."""
    return _process(dataset, "arc_challenge")


def process_hellaswag(dataset):
    return _process(dataset, "hellaswag")


def process_truthfulqa_mc1(dataset):
    return _process(dataset, "truthfulqa_mc1")
