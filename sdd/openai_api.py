"""The one client of OpenAI-compatible endpoints: key handling, bounded concurrency, retries, an sqlite cache.

Two users share it: the LLM judges (:mod:`sdd.evaluation.llm_judge`, ``/chat/completions``) and the
generation backend (:mod:`sdd.evaluation.openai_generation`, ``/completions`` or ``/chat/completions``,
e.g. a ``vllm serve`` server). Each user owns its request bodies, its cache keys and its messages;
this module owns how they travel:

- :class:`EndpointClient` posts a batch of bodies with at most ``max_concurrency`` requests under way,
  retries connection errors, timeouts, HTTP 429 and 5xx with exponential backoff (a ``Retry-After``
  header sets the pause instead), stops every request at once on 401/403/404 (no retry can fix a key or
  a path), and hands each reply to the caller as soon as it arrives, so it is cached before the next.
- :class:`ReplyCache` is an sqlite file of replies keyed by a hash the caller computes
  (:func:`stable_key`); WAL mode and autocommit let runs, processes and users share a file.

The API key is read from an environment variable whose NAME the config holds: it is sent only in the
Authorization header and scrubbed from anything an endpoint echoes back; it never reaches a log,
an error message or the cache.
"""

from __future__ import annotations

import concurrent.futures
import email.utils
import hashlib
import json
import logging
import os
import random
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

import httpx

from sdd.errors import UserError

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 30.0
# A server may ask for a longer pause than our own backoff cap; we honour it, within reason.
MAX_RETRY_AFTER_SECONDS = 300.0
MAX_REASON_CHARS = 500
# Statuses that no retry and no other request can fix: stop every request at once.
FATAL_STATUSES = {401: "authentication", 403: "authentication", 404: "not found"}


class EndpointError(UserError, RuntimeError):
    """The endpoint failed (down after all retries, or fatal); every reply obtained so far is cached.

    Attributes:
        url: the endpoint URL (credentials removed).
        num_done: items of the failed call that now have a reply in the cache.
        num_total: items in the failed call.
    """

    def __init__(self, message: str, url: str, num_done: int, num_total: int) -> None:
        super().__init__(message)
        self.url = url
        self.num_done = num_done
        self.num_total = num_total


class EndpointAuthenticationError(EndpointError):
    """The endpoint rejected the key (HTTP 401/403): fixed by the key, not by retrying."""


class ReplyCacheError(UserError, RuntimeError):
    """A reply cache file cannot be used as an sqlite database."""


def read_api_key(env_name: str) -> str | None:
    """The API key in the environment variable ``env_name``, or None when it is unset or blank."""
    return os.environ.get(env_name, "").strip() or None


def stable_key(parts: Sequence[Any]) -> str:
    """SHA-256 of the JSON of ``parts``: a cache key that changes whenever any part does."""
    return hashlib.sha256(json.dumps(list(parts), ensure_ascii=False).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------- client


@dataclass(frozen=True)
class RetrySettings:
    """How a batch of requests is sent.

    Attributes:
        max_retries: retries per request after the first attempt, on connection errors, timeouts,
            HTTP 429 and 5xx.
        backoff_seconds: base of the exponential backoff (with jitter, capped at 30 s).
        timeout_seconds: timeout of each request.
        max_concurrency: most requests under way at once.
    """

    max_retries: int = 5
    backoff_seconds: float = 1.0
    timeout_seconds: float = 60.0
    max_concurrency: int = 4

    def problem(self) -> str | None:
        """What is out of range, as the end of a sentence ("needs max_concurrency >= 1, ..."), or None."""
        if self.max_concurrency < 1 or self.max_retries < 0 or self.backoff_seconds < 0 or self.timeout_seconds <= 0:
            return (
                f"max_concurrency >= 1, max_retries >= 0, backoff_seconds >= 0 and timeout_seconds > 0 "
                f"(got {self.max_concurrency}, {self.max_retries}, {self.backoff_seconds}, {self.timeout_seconds})"
            )
        return None


@dataclass
class _Outcome:
    """What one worker obtained: a reply, an error (fatal or not), or an exhausted/skipped request."""

    reply: str | None = None
    error: str | None = None
    fatal: str | None = None  # a FATAL_STATUSES cause: stop every request
    exhausted: bool = False  # retries used up on retryable failures: the endpoint is down
    skipped: bool = False  # not (fully) tried because another request stopped the batch


@dataclass
class BatchResult:
    """What :meth:`EndpointClient.post_all` obtained.

    Attributes:
        replies: the reply text by key, for every request that succeeded in this call.
        errors: the error by key of requests the endpoint rejected for themselves (HTTP 400, a
            malformed body): not retried, not cached.
        exhausted: the last error of each request still failing after all retries.
        fatal: (cause, detail) of each request that got a FATAL_STATUSES answer.
        unexpected: an exception raised by our own code (a bug), re-raised by the caller.
    """

    replies: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    exhausted: list[str] = field(default_factory=list)
    fatal: list[tuple[str, str]] = field(default_factory=list)
    unexpected: BaseException | None = None

    @property
    def stopped(self) -> bool:
        """True when the batch stopped early: the endpoint is down, refused the key or the path, or a bug."""
        return bool(self.exhausted or self.fatal or self.unexpected is not None)


def chat_reply_text(payload: Any) -> str:
    """The assistant text of a ``/chat/completions`` response body ("" when the endpoint filtered it)."""
    content = payload["choices"][0]["message"].get("content")
    return content if isinstance(content, str) else ""


def completion_text(payload: Any) -> str:
    """The generated text of a ``/completions`` response body."""
    text = payload["choices"][0]["text"]
    if not isinstance(text, str):
        raise TypeError("text is not a string")
    return text


ROUTES: dict[str, Callable[[Any], str]] = {"chat/completions": chat_reply_text, "completions": completion_text}


class EndpointClient:
    """Posts request bodies to one route of an OpenAI-compatible API.

    Args:
        base_url: the API root, e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``.
        route: ``chat/completions`` or ``completions``; requests go to ``{base_url}/{route}``.
        api_key: sent as ``Authorization: Bearer <key>``; None sends no Authorization header.
        settings: retries, backoff, timeout and concurrency.
        label: who sends (``rubric judge``, ``generation``), for logs and thread names.
    """

    def __init__(self, base_url: str, route: str, api_key: str | None, settings: RetrySettings, label: str) -> None:
        if route not in ROUTES:
            raise ValueError(f"Unknown route '{route}': one of {sorted(ROUTES)}.")
        self.base_url = base_url.rstrip("/")
        self.route = route
        self.url = f"{self.base_url}/{route}"
        self.settings = settings
        self.label = label
        self._api_key = api_key  # private and kept out of repr, logs, errors and the cache

    @property
    def has_key(self) -> bool:
        return self._api_key is not None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={redact_url(self.url)!r}, label={self.label!r})"

    def post_all(
        self, bodies: Mapping[str, dict[str, Any]], on_reply: Callable[[str, str], None], progress: str | None = None
    ) -> BatchResult:
        """POST every body; ``on_reply(key, text)`` runs (in the calling thread) as each reply arrives.

        After a fatal answer or a request that exhausted its retries, no new request starts; the ones
        under way finish and their replies are handed over, so whatever was obtained can be cached.

        Args:
            bodies: the JSON body of each request, by the caller's key.
            on_reply: receives each successful reply (e.g. to store it in the cache).
            progress: a progress-bar title, or None for no bar.
        """
        result = BatchResult()
        if not bodies:
            return result
        from tqdm.auto import tqdm

        abort = threading.Event()  # set once the batch must stop: start no new request
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        concurrency = self.settings.max_concurrency
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        thread_prefix = self.label.replace(" ", "-")
        with (
            httpx.Client(headers=headers, timeout=self.settings.timeout_seconds, limits=limits) as client,
            concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix=thread_prefix) as pool,
            tqdm(total=len(bodies), desc=progress, disable=progress is None) as bar,
        ):
            futures = {pool.submit(self._post_one, client, body, abort): key for key, body in bodies.items()}
            # Drain every future even after a failure, so that whatever was obtained gets handed over.
            for future in concurrent.futures.as_completed(futures):
                key = futures[future]
                bar.update(1)
                try:
                    outcome = future.result()
                    if outcome.fatal is not None:
                        result.fatal.append((outcome.fatal, outcome.error or "unknown error"))
                    elif outcome.exhausted:
                        result.exhausted.append(outcome.error or "unknown error")
                    elif outcome.skipped:
                        continue
                    elif outcome.error is not None:
                        result.errors[key] = outcome.error
                    else:
                        on_reply(key, outcome.reply or "")
                        result.replies[key] = outcome.reply or ""
                except BaseException as error:  # a bug, not the endpoint: stop, but keep what we have
                    abort.set()
                    result.unexpected = result.unexpected or error
        return result

    def failure(
        self,
        result: BatchResult,
        *,
        who: str,
        config_key: str,
        model: str,
        model_noun: str,
        api_key_env: str,
        resume: str,
        num_done: int,
        num_total: int,
        endpoint_error: type[EndpointError] = EndpointError,
        authentication_error: type[EndpointError] = EndpointAuthenticationError,
        model_hint: str = "",
        down_hint: str = "",
    ) -> EndpointError:
        """The one-line error of a stopped batch (raise it; re-raise ``result.unexpected`` first).

        Args:
            result: a batch whose :attr:`BatchResult.stopped` is True, without an unexpected exception.
            who: the sender as the message names it (``rubric judge``, ``generation``).
            config_key: the config node of the endpoint (``eval.judges.rubric``).
            model: the model name sent; model_noun: how to call it (``judge model``, ``model``).
            api_key_env: the key variable's name (never its value).
            resume: how far the call got and how to resume, closing the message.
            num_done, num_total: the items of the call that are done, and all of them.
            endpoint_error, authentication_error: the exception types to return.
            model_hint: appended after the model name of a 404 message.
            down_hint: a sentence put before ``resume`` when the endpoint is down.
        """
        url = redact_url(self.url)
        counts = {"url": url, "num_done": num_done, "num_total": num_total}
        if result.fatal:
            cause, detail = result.fatal[0]
            if cause == "authentication":
                unset = "" if self._api_key else " (it is unset, and allow_missing_key is true)"
                return authentication_error(
                    f"The {who} endpoint {url} rejected the credentials ({detail}): check the key in "
                    f"${api_key_env}{unset}. {resume}",
                    **counts,
                )
            return endpoint_error(
                f"The {who} endpoint {url} answered {detail}: check {config_key}.base_url (requests go to "
                f"<base_url>/{self.route}) and the {model_noun} name '{model}'{model_hint}. {resume}",
                **counts,
            )
        return endpoint_error(
            f"The {who} endpoint {url} is down or unreachable: it kept failing after {self.settings.max_retries} "
            "retries "
            f"({result.exhausted[0] if result.exhausted else 'unknown error'}).{' ' + down_hint if down_hint else ''} "
            f"{resume}",
            **counts,
        )

    def _post_one(self, client: httpx.Client, body: dict[str, Any], abort: threading.Event) -> _Outcome:
        """POST one body, retrying on connection errors, timeouts, 429 and 5xx."""
        last_error = "no attempt"
        max_retries = self.settings.max_retries
        for attempt in range(max_retries + 1):
            if abort.is_set():
                return _Outcome(skipped=True, error=last_error)
            retry_after: float | None = None
            try:
                response = client.post(self.url, json=body)
            except httpx.TransportError as error:  # connection refused/reset, timeouts
                last_error = self._scrub(f"{type(error).__name__}: {error}")
            except httpx.HTTPError as error:  # e.g. an invalid URL: retrying will not help
                return _Outcome(error=self._scrub(f"{type(error).__name__}: {error}"))
            else:
                if response.status_code == 200:
                    return self._reply_of(response)
                last_error = self._scrub(f"HTTP {response.status_code}: {shorten(response.text, 200)}")
                if response.status_code in FATAL_STATUSES:
                    abort.set()  # no other request can succeed: stop them all
                    return _Outcome(error=last_error, fatal=FATAL_STATUSES[response.status_code])
                if response.status_code != 429 and response.status_code < 500:
                    log.error(
                        "%s request rejected by %s (%s); not retried.", self.label, redact_url(self.url), last_error
                    )
                    return _Outcome(error=last_error)
                retry_after = retry_after_seconds(response.headers.get("Retry-After"))
            if attempt == max_retries:
                break
            delay = retry_after if retry_after is not None else self._backoff(attempt)
            log.warning(
                "%s request to %s failed (%s); retry %d/%d in %.2f s.",
                self.label,
                redact_url(self.url),
                last_error,
                attempt + 1,
                max_retries,
                delay,
            )
            if abort.wait(delay):  # another request gave up meanwhile: stop early
                return _Outcome(skipped=True, error=last_error)
        abort.set()  # here, not in the caller: the next queued request must see it before it starts
        return _Outcome(error=last_error, exhausted=True)

    def _reply_of(self, response: httpx.Response) -> _Outcome:
        """The text of a 200 response; a malformed body is an error (not cached)."""
        try:
            return _Outcome(reply=ROUTES[self.route](response.json()))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return _Outcome(error=self._scrub(f"malformed {self.route} response: {shorten(response.text, 200)}"))

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with "equal jitter": half fixed, half random, so clients spread out."""
        ceiling = min(MAX_BACKOFF_SECONDS, self.settings.backoff_seconds * 2**attempt)
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def _scrub(self, text: str) -> str:
        """Remove the key from text an endpoint may echo back (some echo a rejected key)."""
        return text.replace(self._api_key, "***") if self._api_key else text


# ---------------------------------------------------------------------------------------- cache


class ReplyCache:
    """An sqlite table of replies: ``key`` (the caller's hash), descriptive text columns, ``reply``, ``created``.

    Args:
        path: the sqlite file (created with its folder).
        table: the table name; several tables (and users) may share a file.
        columns: the descriptive columns stored with each reply (e.g. ``judge``, ``model``).
        owner: who uses the cache, as messages name it (``rubric judge``).
        config_key: the setting that names the file (``eval.judges.rubric.cache_path``).
        error: the exception type raised for a file that is not an sqlite database.

    Raises:
        ReplyCacheError (or ``error``): ``path`` is not a usable sqlite database.
    """

    def __init__(
        self,
        path: str | Path,
        table: str,
        columns: Sequence[str],
        owner: str,
        config_key: str,
        error: type[Exception] = ReplyCacheError,
    ) -> None:
        self.path = Path(path)
        self.table = table
        self.columns = tuple(columns)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            connection = self.connect()
            try:
                connection.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
                described = "".join(f" {column} TEXT NOT NULL," for column in self.columns)
                connection.execute(
                    f"CREATE TABLE IF NOT EXISTS {table} ("
                    f" key TEXT PRIMARY KEY,{described} reply TEXT NOT NULL, created REAL NOT NULL)"
                )
            finally:
                connection.close()
        except sqlite3.DatabaseError as failure:
            if isinstance(failure, sqlite3.OperationalError) and "locked" in str(failure):
                raise  # another process holds it: not a broken file
            path = self.path
            raise error(
                f"The {owner} cache {path} is not a usable sqlite database ({failure}). Move it aside "
                f"(`mv {path} {path}.bad`, with any {path.name}-wal / -shm beside it) or set {config_key} to "
                f"another file; the {owner} then starts a new cache."
            ) from failure

    def connect(self) -> sqlite3.Connection:
        """A connection in autocommit mode, so each reply is on disk as soon as it is stored; a long
        timeout waits out other processes writing to the same file."""
        return sqlite3.connect(self.path, timeout=60, isolation_level=None)

    def lookup(self, connection: sqlite3.Connection, keys: set[str]) -> dict[str, str]:
        """The cached reply of each of ``keys`` that has one."""
        found: dict[str, str] = {}
        keys_list = sorted(keys)
        for start in range(0, len(keys_list), 500):  # stay below sqlite's bound-parameter limit
            chunk = keys_list[start : start + 500]
            rows = connection.execute(
                f"SELECT key, reply FROM {self.table} WHERE key IN ({','.join('?' * len(chunk))})", chunk
            )
            found.update(dict(rows))
        return found

    def store(self, connection: sqlite3.Connection, key: str, reply: str, **columns: str) -> None:
        """Store (or replace) the reply of ``key`` with its descriptive columns."""
        names = ", ".join(("key", *self.columns, "reply", "created"))
        values = (key, *(columns[column] for column in self.columns), reply, time.time())
        connection.execute(
            f"INSERT OR REPLACE INTO {self.table} ({names}) VALUES ({', '.join('?' * len(values))})", values
        )


# ---------------------------------------------------------------------------------------- text helpers


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), capped; None if absent/bad."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


def redact_url(url: str) -> str:
    """The URL without user:password@ credentials, for messages and logs."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def shorten(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` on one line (whitespace collapsed), cut to ``limit`` characters."""
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
