"""Overlap between training data and evaluation prompts: exact and near-duplicate counts (0 expected).

The measure, per (training set, evaluation set), counts evaluation prompts:

- ``exact``: its normalized text (:func:`sdd.data.splits.normalize_text`: Unicode-normalized,
  case-folded, punctuation and spacing collapsed) equals a training text's;
- ``near_duplicate``: not exact, but the Jaccard similarity of its set of word 3-grams ("shingles" of
  the normalized text; a text under 3 words is one shingle) and a training text's is >= 0.6.

The search is an inverted index shingle -> training texts with prefix filtering: a training text with
Jaccard >= t shares at least ceil(t·|S|) of the query's |S| shingles, hence one of any
|S| - ceil(t·|S|) + 1 of them; only texts sharing one of the query's rarest shingles are candidates,
and each candidate's exact Jaccard is computed. 10,000 training texts x 1,000 prompts take about a
second.

A pipeline point (:func:`point_overlap`) compares every data source its defense and attack stages
train on (any source node under ``data``: ``data.source``, ``data.streams.*.source``,
``data.builder.harmful``, ``data.builder.answers.*``) with every prompt set its evaluations answer
(harmful and benign, sliced as evaluated). Texts compared: the ``instruction`` or ``prompt`` column,
or the user turns of ``conversations``. A training source counts whole, before any k-shot sampling:
a superset of what was trained on.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from sdd.data.sources import load_records
from sdd.data.splits import normalize_text

log = logging.getLogger(__name__)

NGRAM = 3
NEAR_THRESHOLD = 0.6
MEASURE = (
    f"exact: equal normalized text (case-folded, punctuation and spacing collapsed); near_duplicate: not "
    f"exact, Jaccard similarity of word {NGRAM}-gram sets >= {NEAR_THRESHOLD}. Counts are evaluation prompts "
    "with a match in the training set (the whole training source, before k-shot sampling)."
)
USER_ROLES = {"human", "user"}


def shingles(text: Any, n: int = NGRAM) -> frozenset[str]:
    """The set of word n-grams of the normalized text (the whole text when it has fewer than n words)."""
    words = normalize_text(text).split()
    if len(words) < n:
        return frozenset([" ".join(words)]) if words else frozenset()
    return frozenset(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))


class OverlapIndex:
    """Training texts indexed for exact and near-duplicate lookup.

    Args:
        texts: the training texts.
        n: words per shingle.
        threshold: the Jaccard similarity at or above which two texts are near duplicates.
    """

    def __init__(self, texts: Iterable[Any], n: int = NGRAM, threshold: float = NEAR_THRESHOLD) -> None:
        self.n, self.threshold = n, threshold
        self.exact: set[str] = set()
        self.sets: list[frozenset[str]] = []
        self.postings: dict[str, list[int]] = defaultdict(list)
        for text in texts:
            self.exact.add(normalize_text(text))
            shingle_set = shingles(text, n)
            for shingle in shingle_set:
                self.postings[shingle].append(len(self.sets))
            self.sets.append(shingle_set)
        self.size = len(self.sets)

    def match(self, text: Any) -> str | None:
        """``"exact"``, ``"near_duplicate"`` or None for one evaluation text."""
        normalized = normalize_text(text)
        if not normalized:
            return None
        if normalized in self.exact:
            return "exact"
        query = shingles(text, self.n)
        needed = math.ceil(self.threshold * len(query) - 1e-9)  # shared shingles any match must have
        prefix = sorted(query, key=lambda s: (len(self.postings.get(s, ())), s))[: len(query) - needed + 1]
        candidates = {i for shingle in prefix for i in self.postings.get(shingle, ())}
        for index in candidates:
            shared = len(query & self.sets[index])
            if shared / (len(query) + len(self.sets[index]) - shared) >= self.threshold:
                return "near_duplicate"
        return None


def count_overlaps(
    train_sets: Mapping[str, Sequence[Any]],
    eval_sets: Mapping[str, Sequence[Any]],
    n: int = NGRAM,
    threshold: float = NEAR_THRESHOLD,
) -> dict[str, Any]:
    """Exact and near-duplicate counts of every evaluation set against every training set.

    Returns:
        ``{"measure", "ngram", "near_threshold", "train_sets": {name: size}, "eval_sets": {name: size},
        "pairs": {train name: {eval name: {"exact", "near_duplicate"}}}, "total": {"exact", "near_duplicate"}}``.
    """
    pairs: dict[str, dict[str, dict[str, int]]] = {}
    total = {"exact": 0, "near_duplicate": 0}
    for train_name, train_texts in train_sets.items():
        index = OverlapIndex(train_texts, n, threshold)
        pairs[train_name] = {}
        for eval_name, eval_texts in eval_sets.items():
            counts = {"exact": 0, "near_duplicate": 0}
            for text in eval_texts:
                kind = index.match(text)
                if kind is not None:
                    counts[kind] += 1
            pairs[train_name][eval_name] = counts
            for kind in total:
                total[kind] += counts[kind]
    return {
        "measure": MEASURE,
        "ngram": n,
        "near_threshold": threshold,
        "train_sets": {name: len(texts) for name, texts in train_sets.items()},
        "eval_sets": {name: len(texts) for name, texts in eval_sets.items()},
        "pairs": pairs,
        "total": total,
    }


def prompt_texts(records: Sequence[Mapping[str, Any]]) -> list[str] | None:
    """The prompt side of records: ``instruction``, ``prompt``, or the user turns of ``conversations``.

    Returns None when the records have none of these (an answer-only source).
    """
    if not records:
        return []
    for column in ("instruction", "prompt"):
        if column in records[0]:
            return [str(r[column]) for r in records if r.get(column) not in (None, "")]
    if "conversations" in records[0]:
        texts = []
        for record in records:
            for turn in record.get("conversations") or []:
                if not isinstance(turn, Mapping):
                    continue
                role = str(turn.get("from", turn.get("role", ""))).lower()
                content = turn.get("value", turn.get("content"))
                if role in USER_ROLES and content:
                    texts.append(str(content))
        return texts
    return None


def find_sources(node: Any, path: str) -> list[tuple[str, Any]]:
    """Every data-source node under ``node`` (a mapping with ``columns`` and ``path`` or ``hub_id``)."""
    if isinstance(node, (list, tuple, ListConfig)):
        return [found for index, item in enumerate(node) for found in find_sources(item, f"{path}.{index}")]
    if not isinstance(node, (Mapping, DictConfig)):
        return []
    keys = set(node.keys())
    if "columns" in keys and ({"path", "hub_id"} & keys):
        return [(path, node)]
    found = []
    for key in node.keys():
        if key == "retain" and not node.get("retain_ratio"):  # a retention source at ratio 0 is never read
            continue
        found += find_sources(node.get(key), f"{path}.{key}")
    return found


def point_overlap(stages: Mapping[str, Any]) -> dict[str, Any]:
    """The overlap of a pipeline point: its training stages' sources against its evaluations' prompt sets.

    Args:
        stages: stage name -> an object with ``kind`` (defense | attack | evaluate) and its composed ``cfg``.

    Returns:
        :func:`count_overlaps`'s dict, plus ``sources`` (training set -> the source's config name) and
        ``not_compared`` (training sets without a prompt column, and why). Logs a warning naming every
        (training set, evaluation set) pair with a non-zero count.
    """
    train_sets: dict[str, list[str]] = {}
    sources: dict[str, str] = {}
    not_compared: dict[str, str] = {}
    eval_sets: dict[str, list[str]] = {}
    loaded: dict[str, list[str] | None] = {}
    for stage_name, stage in stages.items():
        cfg = stage.cfg
        if stage.kind in ("defense", "attack"):
            read = "weight_edit" if cfg.get("attack_kind") == "weight_edit" else "data"  # a weight edit's own prompts
            for path, node in find_sources(cfg.get(read), read):
                name = f"{stage_name}/{path}"  # defense/..., attack/..., attack_2/... (a chain's later stages)
                spec = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
                key = json.dumps(spec, sort_keys=True, default=str)
                if key not in loaded:
                    loaded[key] = prompt_texts(load_records(spec))
                sources[name] = str(spec.get("name") or path)
                if loaded[key] is None:
                    not_compared[name] = "no prompt column (instruction, prompt or conversations)"
                else:
                    train_sets[name] = loaded[key]
        elif stage.kind == "evaluate":  # before and after the attack: the same prompt sets
            for name, texts in evaluation_sets(cfg).items():
                eval_sets.setdefault(name, texts)
    result = count_overlaps(train_sets, eval_sets)
    result["sources"] = sources
    result["not_compared"] = not_compared
    found = [
        f"{train} ({sources[train]}) x {evaluation}: {c['exact']} exact, {c['near_duplicate']} near-duplicate"
        for train, row in result["pairs"].items()
        for evaluation, c in row.items()
        if c["exact"] or c["near_duplicate"]
    ]
    if found:
        log.warning(
            "Training data overlap evaluation prompts (0 expected; partition shared sources, see "
            "sdd/data/splits.py): %s",
            "; ".join(found),
        )
    return result


def evaluation_sets(cfg: DictConfig) -> dict[str, list[str]]:
    """The prompts an evaluation config answers, sliced as evaluated: ``harmful/<set>`` and ``benign/<set>``."""
    from sdd.evaluation.benign import load_benign_sets
    from sdd.evaluation.run import load_prompt_sets

    sets: dict[str, list[str]] = defaultdict(list)
    harm, benign = cfg.eval.harmfulness, cfg.eval.get("benign")
    if harm.enabled and harm.prompt_sets:
        for row in load_prompt_sets(harm.prompt_sets, harm.max_prompts_per_set):
            sets[f"harmful/{row['prompt_set']}"].append(row["prompt"])
    if benign is not None and benign.enabled and benign.prompt_sets:
        for row in load_benign_sets(benign.prompt_sets, benign.max_prompts_per_set):
            sets[f"benign/{row['prompt_set']}"].append(row["instruction"])
    return dict(sets)
