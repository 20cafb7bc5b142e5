"""SDD's training set: harmful instructions paired with irrelevant high-quality answers.

Paper (SDD, ACL 2025, §5.2): 8K harmful instructions from BeaverTails, balanced over its 14 harm
categories; for each, a random response from Alpaca / LIMA; if the SentenceBERT cosine similarity
of instruction and answer exceeds a threshold, a new answer is drawn, so that no answer carries
information useful to the harmful request. The paper names neither the threshold nor the SentenceBERT
model nor a bound on redraws: 0.25, all-MiniLM-L6-v2 and 50 tries are our choices.

Only the answers that are drawn are embedded, round by round (all first draws in one batch, then the
redraws of the rejected ones), through the embedding cache shared with the relevance judge
(:mod:`sdd.embeddings`), so a build costs what its pairs need and a rebuild with another seed,
threshold, size or category filter embeds only texts never seen. The pairs depend on the seed and the
vectors only, never on what the cache held.

The built set is written as ``pairs.jsonl`` plus ``manifest.json`` (statistics) under a folder named
by the hash of everything that determines it, and reused while that hash is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from sdd.data.sources import DataSource, DataSourceError, load_records

# The encoder lives in sdd.embeddings (shared with the relevance judge); re-exported for existing imports.
from sdd.embeddings import (  # noqa: F401
    MINILM,
    CachedEmbedder,
    Embedder,
    EmbeddingCache,
    SentenceEncoder,
    resolve_sentence_encoder,
    sentence_embedder,
)

log = logging.getLogger(__name__)

UNCATEGORIZED = "uncategorized"


# ---------------------------------------------------------------------------- matching
@dataclass
class MatchResult:
    answer_index: np.ndarray  # (n_instructions,) index into the answer pool
    similarity: np.ndarray  # cosine similarity of each kept pair
    tries: np.ndarray  # draws used per instruction (1 = first draw kept)
    fallback: np.ndarray  # True where no draw passed and the least similar one was kept
    rounds: int = 0  # draw rounds run (a round redraws every instruction still without an answer)


class LazyAnswerVectors:
    """The answer pool's vectors, embedded when first indexed: ``vectors[indices]`` embeds the not yet
    embedded answers among ``indices`` in one call, then returns the rows.

    Args:
        texts: the answer pool.
        embed: texts -> unit vectors (e.g. a :class:`sdd.embeddings.CachedEmbedder`).
    """

    def __init__(self, texts: Sequence[str], embed: Embedder) -> None:
        self.texts = list(texts)
        self.embed = embed
        self.vectors: np.ndarray | None = None  # (pool, dim), allocated at the first batch
        self.ready = np.zeros(len(self.texts), dtype=bool)

    def __len__(self) -> int:
        return len(self.texts)

    def ensure(self, indices: np.ndarray) -> None:
        """Embed the answers among ``indices`` that are not embedded yet, in one call (in index order)."""
        wanted = np.unique(np.asarray(indices, dtype=np.int64))
        missing = wanted[~self.ready[wanted]]
        if missing.size == 0:
            return
        batch = np.asarray(self.embed([self.texts[i] for i in missing]), dtype=np.float32)
        if self.vectors is None:
            self.vectors = np.zeros((len(self.texts), batch.shape[1]), dtype=np.float32)
        self.vectors[missing] = batch
        self.ready[missing] = True

    def __getitem__(self, indices: np.ndarray) -> np.ndarray:
        self.ensure(indices)
        return self.vectors[indices]

    @property
    def num_embedded(self) -> int:
        """Answers whose vectors were needed (embedded now or read from the cache)."""
        return int(self.ready.sum())


class IrrelevantAnswerMatcher:
    """Draws a random answer per instruction, redrawing while the pair is too similar.

    The draws are made up front (``max_tries`` per instruction, from the seed); round ``t`` looks at the
    ``t``-th draw of every instruction still without an answer, so only the answers actually looked at
    need vectors, and the result is the same whether the vectors are embedded lazily or all at once.

    Args:
        threshold: a pair is kept when cosine similarity <= threshold (0.25 by default: our choice, the
            paper gives no value).
        max_tries: draws per instruction before giving up; then the least similar draw is kept and
            counted as a fallback.
        seed: the draws are a pure function of the seed and the inputs' order.
    """

    def __init__(self, threshold: float = 0.25, max_tries: int = 50, seed: int = 0) -> None:
        if max_tries < 1:
            raise ValueError("max_tries must be >= 1")
        self.threshold = threshold
        self.max_tries = max_tries
        self.seed = seed

    def draws(self, num_instructions: int, pool_size: int) -> np.ndarray:
        """The answer indices every instruction may draw, in order: ``(num_instructions, max_tries)``."""
        if pool_size == 0:
            raise DataSourceError("The answer pool is empty: check data.answers.")
        return np.random.default_rng(self.seed).integers(0, pool_size, size=(num_instructions, self.max_tries))

    def match(self, instruction_vectors: np.ndarray, answer_vectors: np.ndarray | LazyAnswerVectors) -> MatchResult:
        """Match each instruction (rows of unit vectors) with an answer (rows of unit vectors).

        Args:
            instruction_vectors: ``(n, dim)``.
            answer_vectors: ``(pool, dim)``, or a :class:`LazyAnswerVectors` that embeds what is drawn.
        """
        n = len(instruction_vectors)
        draws = self.draws(n, len(answer_vectors))
        chosen = np.empty(n, dtype=np.int64)
        similarity = np.empty(n, dtype=np.float32)
        tries = np.full(n, self.max_tries, dtype=np.int64)
        least = np.full(n, np.inf)  # least similar draw so far, for the fallback
        least_index = np.zeros(n, dtype=np.int64)
        open_rows = np.arange(n)
        rounds = 0
        for attempt in range(self.max_tries):
            if open_rows.size == 0:
                break
            rounds += 1
            candidates = draws[open_rows, attempt]
            # in float64, so a summation order that varies with memory layout cannot show in float32 results
            sims = np.einsum(
                "nd,nd->n",
                instruction_vectors[open_rows].astype(np.float64),
                answer_vectors[candidates].astype(np.float64),
            )
            better = sims < least[open_rows]  # strict: the first of equally similar draws is kept
            least[open_rows[better]] = sims[better]
            least_index[open_rows[better]] = candidates[better]
            passed = sims <= self.threshold
            done = open_rows[passed]
            chosen[done], similarity[done], tries[done] = candidates[passed], sims[passed], attempt + 1
            open_rows = open_rows[~passed]
        chosen[open_rows], similarity[open_rows] = least_index[open_rows], least[open_rows]
        fallback = np.zeros(n, dtype=bool)
        fallback[open_rows] = True
        return MatchResult(chosen, similarity, tries, fallback, rounds)


# ---------------------------------------------------------------------------- balanced sampling
def categories_of(value: Any) -> list[str]:
    """Harm categories of a record: a string, a list, a {category: bool} dict (BeaverTails on the Hub)."""
    if value is None or value == "":
        return [UNCATEGORIZED]
    if isinstance(value, Mapping):
        return sorted(str(k) for k, flagged in value.items() if flagged) or [UNCATEGORIZED]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value] or [UNCATEGORIZED]
    return [str(value)]


def balanced_sample(
    instructions: Sequence[dict[str, Any]],
    num: int,
    seed: int,
    categories: Sequence[str] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Sample ``num`` instructions spread evenly over their categories.

    Each category gets ``num // K`` (the remainder to the first categories by name). A category with
    too few instructions gives all it has, and the shortfall is taken from the others. Only when all
    unique instructions are used up are instructions repeated (each repeat gets its own answer).

    Returns:
        The sampled records (each with a single ``category``) and sampling statistics.
    """
    pools: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(instructions):
        for category in categories_of(record.get("category")):
            pools[category].append(index)
    if categories:
        unknown = sorted(set(categories) - set(pools))
        if unknown:  # a typo must not silently narrow the data set
            raise DataSourceError(
                f"data.builder.categories names categories the harmful instructions do not have: {unknown}. "
                f"Valid: {sorted(pools)}. Fix data.builder.categories (null keeps every category)."
            )
        pools = {c: pools[c] for c in categories}
    rng = np.random.default_rng(seed)
    names = sorted(pools)
    shuffled = {c: [pools[c][i] for i in rng.permutation(len(pools[c]))] for c in names}
    quota = {c: num // len(names) + (1 if i < num % len(names) else 0) for i, c in enumerate(names)}

    used: set[int] = set()
    taken: dict[str, list[int]] = {c: [] for c in names}

    def take(category: str, count: int) -> int:
        got = 0
        pool = shuffled[category]
        while got < count and pool:
            index = pool.pop()
            if index not in used:
                used.add(index)
                taken[category].append(index)
                got += 1
        return got

    # Smallest pools first, so a multi-label instruction is not spent on a category that has plenty.
    shortfall = 0
    for category in sorted(names, key=lambda c: (len(pools[c]), c)):
        shortfall += quota[category] - take(category, quota[category])
    while shortfall > 0 and any(shuffled[c] for c in names):  # fill from categories with spare rows
        for category in names:
            if shortfall > 0:
                shortfall -= take(category, 1)
    repeats = shortfall
    if shortfall > 0:  # every unique instruction is used: repeat each category's own up to its quota
        unique = {c: list(taken[c]) for c in names}
        while shortfall > 0:  # one more to the category furthest below its quota, and again
            category = min((c for c in names if unique[c]), key=lambda c: (len(taken[c]) - quota[c], c))
            taken[category].append(unique[category][len(taken[category]) % len(unique[category])])
            shortfall -= 1
        log.warning("Only %d unique harmful instructions for %d pairs: %d are repeated", len(used), num, repeats)
    sampled = [dict(instructions[i], category=c) for c in names for i in taken[c]]
    order = rng.permutation(len(sampled))
    sampled = [sampled[i] for i in order]
    stats = {
        "available_per_category": {c: len(pools[c]) for c in names},
        "quota_per_category": quota,
        "repeated_instructions": repeats,
    }
    return sampled, stats


# ---------------------------------------------------------------------------- builder
class SDDPairBuilder:
    """Builds (and caches) the SDD set of <harmful instruction, irrelevant answer> pairs.

    Args:
        harmful: source of harmful instructions, columns ``instruction`` and optionally ``category``.
        answers: sources of high-quality answers, column ``answer`` (Alpaca, LIMA responses only).
        num_pairs: size of the built set (paper: 8,000).
        threshold, max_tries: see :class:`IrrelevantAnswerMatcher`.
        categories: keep only these harm categories (null: all).
        min_answer_chars: drop answers shorter than this (empty or one-word responses).
        encoder: SentenceTransformer name or folder used for the irrelevance check.
        encoder_batch_size: texts per forward pass; 1 makes each vector a function of its text alone
            (see :mod:`sdd.embeddings`), so a build does not depend on what the embedding cache held.
        seed: makes the whole build deterministic.
        cache_dir: where built sets are written, one folder per configuration hash.
        embedding_cache: SQLite file of vectors keyed by (encoder, text), shared with the relevance judge
            (null: no cache; each build embeds what it draws).
        embed_whole_pool_above: when the first draws alone cover at least this share of the answer pool,
            the whole pool is embedded in that batch: at most twice the draws' cost, and every later build
            (another seed, threshold, size, category filter) then finds all answers in the cache. null:
            only what is drawn. Changes what is embedded, never the pairs.
    """

    def __init__(
        self,
        harmful: Mapping[str, Any],
        answers: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]],
        num_pairs: int = 8000,
        threshold: float = 0.25,
        max_tries: int = 50,
        categories: Sequence[str] | None = None,
        min_answer_chars: int = 1,
        encoder: str = MINILM,
        encoder_batch_size: int = 1,
        seed: int = 0,
        cache_dir: str | os.PathLike = ".cache/sdd_pairs",
        embedding_cache: str | os.PathLike | None = None,
        embed_whole_pool_above: float | None = 0.5,
    ) -> None:
        if num_pairs < 1:
            raise DataSourceError("data.builder.num_pairs must be at least 1.")
        self.harmful = DataSource.from_config(harmful, "data.builder.harmful")
        items = answers.items() if isinstance(answers, Mapping) else enumerate(answers)
        self.answers = [DataSource.from_config(spec, f"data.builder.answers.{key}") for key, spec in items]
        if not self.answers:
            raise DataSourceError("data.builder.answers is empty: name at least one answer source (Alpaca, LIMA).")
        self.num_pairs = num_pairs
        self.threshold = threshold
        self.max_tries = max_tries
        self.categories = list(categories) if categories else None
        self.min_answer_chars = min_answer_chars
        self.encoder = encoder
        self.encoder_batch_size = encoder_batch_size
        self.seed = seed
        self.cache_dir = Path(cache_dir)
        self.embedding_cache = Path(embedding_cache) if embedding_cache else None
        if embed_whole_pool_above is not None and not 0.0 < embed_whole_pool_above <= 1.0:
            raise DataSourceError(
                f"data.builder.embed_whole_pool_above must be in (0, 1] or null, got {embed_whole_pool_above}."
            )
        self.embed_whole_pool_above = embed_whole_pool_above

    def cache_key(self) -> str:
        spec = {
            "harmful": self.harmful.fingerprint(),
            "answers": [a.fingerprint() for a in self.answers],
            "num_pairs": self.num_pairs,
            "threshold": self.threshold,
            "max_tries": self.max_tries,
            "categories": self.categories,
            "min_answer_chars": self.min_answer_chars,
            "encoder": self.encoder,
            "seed": self.seed,
            # 2: rows with a missing value are dropped (1 built them as the text "None"); 3: answers embedded
            # as drawn, one text per forward pass (vectors differ from 2's batched ones in the last bits)
            "version": 3,
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def output_dir(self) -> Path:
        return self.cache_dir / self.cache_key()

    def build(self, embed: Embedder | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The pairs and their manifest, from the cache when this configuration was built before.

        Args:
            embed: texts -> unit vectors; defaults to ``SentenceEncoder(self.encoder)``. Its vectors go to
                the embedding cache only if it has an ``identity`` (see :class:`sdd.embeddings.CachedEmbedder`).
        """
        folder = self.output_dir()
        pairs_file, manifest_file = folder / "pairs.jsonl", folder / "manifest.json"
        if manifest_file.exists() and pairs_file.exists():
            cached = read_verified_cache(pairs_file, manifest_file)
            if cached is not None:
                log.info("Reusing the SDD pair set in %s", folder)
                return cached
        pairs, manifest = self._build(embed)
        text = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
        manifest["pairs_sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(pairs_file, text)
        _write_atomically(manifest_file, json.dumps(manifest, indent=2))  # last: marks the set complete
        log.info("Wrote %d SDD pairs to %s", len(pairs), folder)
        return pairs, manifest

    def _build(self, embed: Embedder | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        started = time.time()
        harmful = load_records(self.harmful, required=["instruction"])
        dropped_missing = {self.harmful.name: harmful.dropped_missing}
        harmful = _dedupe(harmful, "instruction")
        answer_pool: list[dict[str, Any]] = []
        for source in self.answers:
            rows = load_records(source, required=["answer"])
            dropped_missing[source.name] = rows.dropped_missing
            answer_pool += [
                {"answer": str(r["answer"]).strip(), "source": source.name.rsplit(".", 1)[-1]} for r in rows
            ]
        answer_pool = _dedupe([a for a in answer_pool if len(a["answer"]) >= self.min_answer_chars], "answer")
        if not answer_pool:
            raise DataSourceError(f"No answer of at least {self.min_answer_chars} characters in data.builder.answers.")
        sampled, sampling_stats = balanced_sample(harmful, self.num_pairs, self.seed, self.categories)
        # The encoder loads on its first uncached text, so a bad data file fails before it loads, and a
        # build whose texts are all cached never loads it.
        encoder = embed if embed is not None else SentenceEncoder(self.encoder, self.encoder_batch_size)
        embedder = CachedEmbedder(encoder, self.embedding_cache)
        load_seconds_before = getattr(encoder, "load_seconds", 0.0)
        loaded = time.time()

        # Each distinct text is embedded once; retries only index into these vectors.
        unique_instructions = sorted({str(r["instruction"]) for r in sampled})
        position = {text: i for i, text in enumerate(unique_instructions)}
        instruction_vectors = embedder(unique_instructions)[[position[str(r["instruction"])] for r in sampled]]
        answer_vectors = LazyAnswerVectors([a["answer"] for a in answer_pool], embedder)
        matcher = IrrelevantAnswerMatcher(self.threshold, self.max_tries, self.seed)
        first_draws = np.unique(matcher.draws(len(sampled), len(answer_pool))[:, 0])
        first_draw_share = len(first_draws) / len(answer_pool)
        whole_pool = self.embed_whole_pool_above is not None and first_draw_share >= self.embed_whole_pool_above
        if whole_pool:
            answer_vectors.ensure(np.arange(len(answer_pool)))
        result = matcher.match(instruction_vectors, answer_vectors)
        matched = time.time()
        # the timings cover the build, not the encoder's loading (when this build loaded it)
        encoder_load = getattr(encoder, "load_seconds", 0.0) - load_seconds_before
        pairs = []
        for record, index, sim, tries, fell_back in zip(
            sampled, result.answer_index, result.similarity, result.tries, result.fallback
        ):
            pairs.append(
                {
                    "instruction": str(record["instruction"]),
                    "answer": answer_pool[index]["answer"],
                    "category": record["category"],
                    "answer_source": answer_pool[index]["source"],
                    "similarity": round(float(sim), 6),
                    "tries": int(tries),
                    "fallback": bool(fell_back),
                }
            )
        edges = np.round(np.linspace(-1.0, 1.0, 41), 2)
        counts, _ = np.histogram(result.similarity, bins=edges)
        manifest = {
            "num_pairs": len(pairs),
            "config_hash": self.cache_key(),
            "threshold": self.threshold,
            "max_tries": self.max_tries,
            "seed": self.seed,
            "encoder": self.encoder,
            "harmful_instructions_available": len(harmful),
            "answers_available": len(answer_pool),
            "answers_per_source": dict(Counter(a["source"] for a in answer_pool)),
            "dropped_missing_values": dropped_missing,  # rows without an instruction / answer, per source
            "rows_per_category": dict(sorted(Counter(p["category"] for p in pairs).items())),
            **sampling_stats,
            "resamples": int((result.tries - 1).sum()),
            "pairs_resampled": int((result.tries > 1).sum()),
            "fallbacks": int(result.fallback.sum()),
            "similarity": {
                "mean": float(result.similarity.mean()),
                "max": float(result.similarity.max()),
                "min": float(result.similarity.min()),
                "above_threshold": int((result.similarity > self.threshold).sum()),
                "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
            },
            # what was embedded and what came from the embedding cache; answers_used: answers looked at
            "embedding": {
                "encoder": getattr(encoder, "identity", None),
                "cache": str(self.embedding_cache) if embedder.cache is not None else None,
                **embedder.counts(),
                "answers_used": answer_vectors.num_embedded,
                "first_draw_pool_share": round(first_draw_share, 4),
                "whole_pool": whole_pool,
                "rounds": result.rounds,
            },
            "build_seconds": round(time.time() - started - encoder_load, 2),
            # load: read, dedupe and sample the sources; embed: the encoder and the embedding cache (the
            # encoder's loading excluded); match: the draws and similarity checks
            "phase_seconds": {
                "load": round(loaded - started, 3),
                "embed": round(embedder.seconds - encoder_load, 3),
                "match": round(matched - loaded - embedder.seconds, 3),
            },
        }
        return pairs, manifest


def read_verified_cache(pairs_file: Path, manifest_file: Path) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """The cached pairs and manifest, or None (with a warning) when the pairs file does not match the
    manifest: fewer or more pairs, a changed checksum, or a line that is not JSON (a truncated copy)."""
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        data = pairs_file.read_bytes()
        pairs = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    except (ValueError, OSError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        problem = f"unreadable ({type(error).__name__}: {error})"
    else:
        expected_sha = manifest.get("pairs_sha256")
        if len(pairs) != manifest.get("num_pairs"):
            problem = f"{len(pairs)} pairs where the manifest says {manifest.get('num_pairs')}"
        elif expected_sha is not None and hashlib.sha256(data).hexdigest() != expected_sha:
            problem = "its checksum differs from the manifest's"
        else:
            return pairs, manifest
    log.warning("The cached SDD pair set %s does not match its manifest (%s): building it again.", pairs_file, problem)
    return None


def _dedupe(records: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    seen: set[str] = set()
    kept = []
    for record in records:
        text = str(record[key])
        if text not in seen:
            seen.add(text)
            kept.append(record)
    return kept


def _write_atomically(path: Path, text: str) -> None:
    staging = path.with_name(path.name + f".tmp-{os.getpid()}")
    staging.write_text(text, encoding="utf-8")
    staging.replace(path)
