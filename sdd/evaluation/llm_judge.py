"""The shared path of every LLM judge: a prompt template, an OpenAI-compatible client, an sqlite cache.

A judge is :class:`ChatJudge` plus a template file (``judge_prompts/``) and a reply parser: the HEx-PHI
rubric (:mod:`sdd.evaluation.rubric_judge`) and StrongREJECT (:mod:`sdd.evaluation.strongreject`).
The client talks to any ``/chat/completions`` endpoint (OpenAI, a local vLLM server, ...), retries
connection errors, timeouts, 429 and 5xx with backoff, and keeps every reply it got in an sqlite cache
keyed by (judge, judge model, SHA-256 of the template, prompt, answer): an interrupted or repeated run
never pays twice, and a changed template never reuses scores given under another. Replies are stored
raw and parsed when read, so a parser fix applies to cached replies too.

A rejected key (HTTP 401/403) or an unknown endpoint or model (404) stops the judge at once; an
endpoint that stays down stops it after the retries; in both cases everything judged so far is cached
and a re-run resumes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import email.utils
import hashlib
import json
import logging
import os
import random
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Mapping, Sequence, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx
from tqdm.auto import tqdm

from sdd.errors import UserError

log = logging.getLogger(__name__)

PROMPTS_DIR = Path(__file__).with_name("judge_prompts")
MAX_BACKOFF_SECONDS = 30.0
# A server may ask for a longer pause than our own backoff cap; we honour it, within reason.
MAX_RETRY_AFTER_SECONDS = 300.0
MAX_REASON_CHARS = 500
# Statuses that no retry and no other item can fix: stop the judge at once.
FATAL_STATUSES = {401: "authentication", 403: "authentication", 404: "not found"}

_ITEM_PLACEHOLDER = re.compile(r"\{(instruction|prompt|response)\}")


class JudgeConfigError(UserError, ValueError):
    """The judge is misconfigured (unset key variable, bad template, ...); nothing was sent."""


class JudgeError(UserError, RuntimeError):
    """A judge could not deliver its verdicts; the message names the cause and the fix."""


class JudgeEndpointError(JudgeError):
    """The endpoint failed (down after all retries, or fatal); every verdict obtained so far is cached.

    Attributes:
        url: the chat-completions URL (credentials removed).
        num_done: items of the failed call that now have a verdict in the cache.
        num_total: items in the failed call.
    """

    def __init__(self, message: str, url: str, num_done: int, num_total: int) -> None:
        super().__init__(message)
        self.url = url
        self.num_done = num_done
        self.num_total = num_total


class JudgeAuthenticationError(JudgeEndpointError):
    """The endpoint rejected the key (HTTP 401/403): fixed by the key, not by retrying."""


class JudgeCacheError(JudgeError):
    """The judge's cache file cannot be used as an sqlite database."""


class TooFewValidVerdictsError(JudgeError):
    """A judge gave valid verdicts on fewer answers than ``eval.judges.min_valid_fraction``."""


# ---------------------------------------------------------------------------------------- templates


def resolve_prompt_file(value: str | os.PathLike) -> Path:
    """The template file a config value names: a bare file name is one of ``judge_prompts/``.

    Raises:
        JudgeConfigError: the file does not exist.
    """
    text = str(value)
    path = PROMPTS_DIR / text if "/" not in text and os.sep not in text else Path(text).expanduser()
    if not path.is_file():
        shipped = ", ".join(sorted(p.name for p in PROMPTS_DIR.glob("*.txt")))
        raise JudgeConfigError(
            f"Judge prompt file '{value}' not found (looked for {path}). Give a path (with a '/'), or the "
            f"name of a template shipped in {PROMPTS_DIR}: {shipped}."
        )
    return path


def _read_template(value: str | os.PathLike) -> str:
    path = resolve_prompt_file(value)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise JudgeConfigError(f"Judge prompt file {path} is not UTF-8 text ({error}). Re-save it as UTF-8.") from error
    if not text.strip():
        raise JudgeConfigError(f"Judge prompt file {path} is empty. Point the judge at a template with "
                               "{instruction} and {response}.")
    return text


@dataclass(frozen=True)
class JudgePrompt:
    """A judge's prompt: an optional system message and a user template with placeholders.

    Attributes:
        user: the user-message template; ``{instruction}`` (or ``{prompt}``) and ``{response}`` are
            replaced per item, nothing else (so literal braces need no escaping).
        system: the system message, or None to send none.
        prompt_file: the config value the user template came from (for the results' judge description).
        system_prompt_file: the same for the system message.
    """

    user: str
    system: str | None = None
    prompt_file: str | None = None
    system_prompt_file: str | None = None

    @classmethod
    def load(cls, prompt_file: str | os.PathLike, system_prompt_file: str | os.PathLike | None = None,
             fill: Mapping[str, str] | None = None) -> "JudgePrompt":
        """Read the template files and fill template-level placeholders.

        Args:
            prompt_file: the user template (a file of ``judge_prompts/`` or a path).
            system_prompt_file: the system message file, or None for no system message.
            fill: template-level placeholders (e.g. ``off_topic_clause``) and their text. An empty
                text removes the line holding only that placeholder.

        Raises:
            JudgeConfigError: a file is missing, empty, not UTF-8, or lacks a required placeholder.
        """
        user = _read_template(prompt_file)
        for name, text in (fill or {}).items():
            marker = "{" + name + "}"
            if not text:
                user = re.sub(rf"(?m)^[ \t]*{re.escape(marker)}[ \t]*\n", "", user)
            user = user.replace(marker, text)
        placeholders = set(_ITEM_PLACEHOLDER.findall(user))
        if "response" not in placeholders or not placeholders & {"instruction", "prompt"}:
            raise JudgeConfigError(
                f"Judge prompt file {resolve_prompt_file(prompt_file)} must contain the placeholders {{instruction}} "
                f"(or {{prompt}}) and {{response}}, where the evaluated prompt and answer go; it has "
                f"{sorted('{' + p + '}' for p in placeholders) or 'none'}."
            )
        system = _read_template(system_prompt_file).strip() if system_prompt_file else None
        return cls(user=user, system=system, prompt_file=str(prompt_file),
                   system_prompt_file=str(system_prompt_file) if system_prompt_file else None)

    @property
    def sha256(self) -> str:
        """SHA-256 of the system message and the filled user template (enters every cache key)."""
        return hashlib.sha256(json.dumps([self.system, self.user]).encode("utf-8")).hexdigest()

    def render(self, instruction: str, response: str) -> str:
        """The user message for one item (a single pass: inserted text is never re-read)."""
        values = {"instruction": instruction, "prompt": instruction, "response": response}
        return _ITEM_PLACEHOLDER.sub(lambda match: values[match.group(1)], self.user)

    def messages(self, instruction: str, response: str) -> list[dict[str, str]]:
        """The chat messages asking the judge about one (prompt, answer) pair."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        return messages + [{"role": "user", "content": self.render(instruction, response)}]


# ---------------------------------------------------------------------------------------- client


@dataclass
class _Outcome:
    """What one worker obtained: a reply, an error (fatal or not), or an exhausted/skipped item."""

    reply: str | None = None
    error: str | None = None
    fatal: str | None = None  # a FATAL_STATUSES cause: stop every item
    exhausted: bool = False  # retries used up on retryable failures: the endpoint is down
    skipped: bool = False  # not (fully) tried because another item stopped the judge


V = TypeVar("V")


class ChatJudge(Generic[V]):
    """An LLM judge over an OpenAI-compatible API; subclasses give the template and the parser.

    Subclasses set ``name`` (its default config key, used in messages) and ``judge_id`` (enters the
    cache key), and implement :meth:`parse_reply` (reply text -> verdict) and :meth:`failed_verdict`
    (request error -> verdict). Verdicts are dataclasses with ``cached`` and ``error`` fields.

    Args:
        base_url: the API root, e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``;
            requests go to ``{base_url}/chat/completions``.
        model: the judge model, e.g. ``gpt-4o``.
        prompt: the judge's prompt (template and system message).
        api_key_env: NAME of the environment variable holding the API key. The key is read once,
            here; it is sent only in the Authorization header and never logged, cached or stored.
        allow_missing_key: accept an unset key (a local server that needs none): then no
            Authorization header is sent.
        cache_path: sqlite file of replies, shared safely by runs, processes and judges.
        max_retries: retries per item after the first attempt, on connection errors, timeouts,
            HTTP 429 and 5xx.
        backoff_seconds: base of the exponential backoff (with jitter, capped at 30 s); a
            ``Retry-After`` header, when present, sets the pause instead.
        timeout_seconds: timeout of each request.
        max_concurrency: most requests under way at once.
        temperature: judge sampling temperature (0: as deterministic as the endpoint allows).
        max_tokens: most tokens in a judge reply.

    Raises:
        JudgeConfigError: the key variable is unset or empty (and ``allow_missing_key`` is False),
            or an argument is out of range.
        JudgeCacheError: ``cache_path`` is not an sqlite database.
    """

    name = "llm_judge"
    judge_id = "chat"

    def __init__(
        self,
        base_url: str,
        model: str,
        prompt: JudgePrompt,
        api_key_env: str = "OPENAI_API_KEY",
        allow_missing_key: bool = False,
        cache_path: str | Path = "llm_judge.sqlite",
        max_retries: int = 5,
        backoff_seconds: float = 1.0,
        timeout_seconds: float = 60,
        max_concurrency: int = 4,
        temperature: float = 0.0,
        max_tokens: int = 512,
    ) -> None:
        if not base_url or not model:
            raise JudgeConfigError(f"The {self.name} judge needs a base_url and a model name "
                                   f"(eval.judges.{self.name}.base_url, .model).")
        if max_concurrency < 1 or max_retries < 0 or backoff_seconds < 0 or timeout_seconds <= 0:
            raise JudgeConfigError(
                f"The {self.name} judge needs max_concurrency >= 1, max_retries >= 0, backoff_seconds >= 0 "
                f"and timeout_seconds > 0 (got {max_concurrency}, {max_retries}, {backoff_seconds}, "
                f"{timeout_seconds})."
            )
        key = os.environ.get(api_key_env, "").strip()
        if not key and not allow_missing_key:
            raise JudgeConfigError(
                f"The {self.name} judge needs an API key in the environment variable {api_key_env}, which is "
                f"unset or empty. Fix: `export {api_key_env}=...` before running (or set the judge's "
                "allow_missing_key for a local server that needs no key), or keep the judges offline "
                f"only (disable this judge, e.g. eval.judges.{self.name}.enabled=false)."
            )
        self._api_key = key or None  # private and kept out of repr, logs, errors and the cache
        self.api_key_env = api_key_env
        self.prompt = prompt
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self.cache_path = Path(cache_path)
        self.max_retries = int(max_retries)
        self.backoff_seconds = float(backoff_seconds)
        self.timeout_seconds = float(timeout_seconds)
        self.max_concurrency = int(max_concurrency)
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self._init_cache()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(url={redact_url(self.url)!r}, model={self.model!r}, "
                f"prompt_file={self.prompt.prompt_file!r}, cache_path={str(self.cache_path)!r})")

    # ------------------------------------------------------------------ to implement

    def parse_reply(self, reply: str) -> V:
        """The verdict a judge reply gives (an invalid verdict when the reply cannot be read)."""
        raise NotImplementedError

    def failed_verdict(self, error: str) -> V:
        """The verdict of an item whose request failed (not cached: a re-run asks again)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ public

    def judge(self, items: Sequence[tuple[str, str]]) -> list[V]:
        """Judge (harmful prompt, model answer) pairs; cached pairs cost no request.

        Args:
            items: (prompt, answer) pairs.

        Returns:
            One verdict per item, in input order.

        Raises:
            JudgeAuthenticationError: the endpoint rejected the key (HTTP 401/403); raised at once.
            JudgeEndpointError: HTTP 404, or an item still failed after ``max_retries`` retries.
                Raised once the requests already under way have finished and their replies are
                cached; items not yet started are left for a re-run, which resumes from the cache.
        """
        items = [self._check_item(i, item) for i, item in enumerate(items)]
        keys = [self.cache_key(prompt, answer) for prompt, answer in items]
        connection = self._connect()
        try:
            cached = self._lookup(connection, set(keys))
            todo: dict[str, tuple[str, str]] = {}  # one request per distinct pair
            for key, item in zip(keys, items):
                if key not in cached:
                    todo.setdefault(key, item)
            log.info("%s judge %s at %s: %d items, %d cached, %d to request.", self.name, self.model,
                     redact_url(self.url), len(items), sum(k in cached for k in keys), len(todo))
            fresh, exhausted, fatal, unexpected = self._request_all(connection, todo)
        finally:
            connection.close()

        if exhausted or fatal or unexpected is not None:
            if unexpected is not None:
                raise unexpected
            # Failed verdicts are not cached, so they do not count as done.
            num_done = sum(key in cached or (key in fresh and fresh[key][1] is None) for key in keys)
            num_new = sum(error is None for _, error in fresh.values())
            progress = (f"{num_done} of {len(items)} items are judged and cached in {self.cache_path} "
                        f"({num_new} in this call); re-running resumes from the cache.")
            url = redact_url(self.url)
            if fatal:
                cause, detail = fatal[0]
                if cause == "authentication":
                    unset = "" if self._api_key else " (it is unset, and allow_missing_key is true)"
                    raise JudgeAuthenticationError(
                        f"The {self.name} judge endpoint {url} rejected the credentials ({detail}): check the key "
                        f"in ${self.api_key_env}{unset}. {progress}", url=url, num_done=num_done, num_total=len(items))
                raise JudgeEndpointError(
                    f"The {self.name} judge endpoint {url} answered {detail}: check "
                    f"eval.judges.{self.name}.base_url (requests go to <base_url>/chat/completions) and the judge "
                    f"model name '{self.model}'. {progress}", url=url, num_done=num_done, num_total=len(items))
            raise JudgeEndpointError(
                f"The {self.name} judge endpoint {url} is down or unreachable: it kept failing after "
                f"{self.max_retries} retries ({exhausted[0]}). {progress}",
                url=url, num_done=num_done, num_total=len(items),
            )
        verdicts = []
        for key in keys:
            if key in cached:
                verdicts.append(dataclasses.replace(self.parse_reply(cached[key]), cached=True))
            else:
                reply, error = fresh[key]
                verdicts.append(self.failed_verdict(error) if error is not None else self.parse_reply(reply or ""))
        return verdicts

    def cache_key(self, prompt: str, answer: str) -> str:
        """sha256 of (judge, judge model, template SHA-256, prompt, answer)."""
        payload = json.dumps([self.judge_id, self.model, self.prompt.sha256, prompt, answer], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    # ------------------------------------------------------------------ requests

    def _request_all(
        self, connection: sqlite3.Connection, todo: dict[str, tuple[str, str]]
    ) -> tuple[dict[str, tuple[str | None, str | None]], list[str], list[tuple[str, str]], BaseException | None]:
        """Request every pair in ``todo``; cache each reply as soon as it arrives.

        Returns:
            (reply, error) by key, the errors of exhausted items, fatal (cause, detail) pairs, and an
            unexpected exception.
        """
        fresh: dict[str, tuple[str | None, str | None]] = {}
        exhausted: list[str] = []
        fatal: list[tuple[str, str]] = []
        unexpected: BaseException | None = None
        if not todo:
            return fresh, exhausted, fatal, unexpected
        abort = threading.Event()  # set once the judge must stop: start no new request
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
        with httpx.Client(headers=headers, timeout=self.timeout_seconds, limits=limits) as client, \
                concurrent.futures.ThreadPoolExecutor(self.max_concurrency, thread_name_prefix=f"{self.name}-judge") as pool:
            futures = {pool.submit(self._request_one, client, prompt, answer, abort): key
                       for key, (prompt, answer) in todo.items()}
            # Drain every future even after a failure, so that whatever was judged gets cached.
            for future in tqdm(concurrent.futures.as_completed(futures), total=len(futures),
                               desc=f"Judging ({self.name})"):
                key = futures[future]
                try:
                    outcome = future.result()
                except BaseException as error:  # a bug, not the endpoint: stop, but keep what we have
                    abort.set()
                    unexpected = unexpected or error
                    continue
                if outcome.fatal is not None:
                    fatal.append((outcome.fatal, outcome.error or "unknown error"))
                elif outcome.exhausted:
                    exhausted.append(outcome.error or "unknown error")
                elif outcome.skipped:
                    continue
                elif outcome.error is not None:
                    fresh[key] = (None, outcome.error)
                else:
                    self._store(connection, key, outcome.reply or "")
                    fresh[key] = (outcome.reply or "", None)
        return fresh, exhausted, fatal, unexpected

    def _request_one(self, client: httpx.Client, prompt: str, answer: str, abort: threading.Event) -> _Outcome:
        """POST one pair, retrying on connection errors, timeouts, 429 and 5xx."""
        body = {
            "model": self.model,
            "messages": self.prompt.messages(prompt, answer),
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        last_error = "no attempt"
        for attempt in range(self.max_retries + 1):
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
                    abort.set()  # no other item can succeed: stop them all
                    return _Outcome(error=last_error, fatal=FATAL_STATUSES[response.status_code])
                if response.status_code != 429 and response.status_code < 500:
                    log.error("%s judge request rejected by %s (%s); not retried.", self.name,
                              redact_url(self.url), last_error)
                    return _Outcome(error=last_error)
                retry_after = _retry_after_seconds(response.headers.get("Retry-After"))
            if attempt == self.max_retries:
                break
            delay = retry_after if retry_after is not None else self._backoff(attempt)
            log.warning("%s judge request to %s failed (%s); retry %d/%d in %.2f s.", self.name,
                        redact_url(self.url), last_error, attempt + 1, self.max_retries, delay)
            if abort.wait(delay):  # another item gave up meanwhile: stop early
                return _Outcome(skipped=True, error=last_error)
        abort.set()  # here, not in the caller: the next queued item must see it before it starts
        return _Outcome(error=last_error, exhausted=True)

    def _reply_of(self, response: httpx.Response) -> _Outcome:
        """The assistant text of a 200 response; a malformed body is an error (not cached)."""
        try:
            content = response.json()["choices"][0]["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return _Outcome(error=self._scrub(f"malformed chat-completions response: {shorten(response.text, 200)}"))
        # content is None when the endpoint filtered the reply: an (invalid) answer all the same.
        return _Outcome(reply=content if isinstance(content, str) else "")

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with "equal jitter": half fixed, half random, so clients spread out."""
        ceiling = min(MAX_BACKOFF_SECONDS, self.backoff_seconds * 2 ** attempt)
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def _scrub(self, text: str) -> str:
        """Remove the key from text an endpoint may echo back (some echo a rejected key)."""
        return text.replace(self._api_key, "***") if self._api_key else text

    # ------------------------------------------------------------------ cache

    def _connect(self) -> sqlite3.Connection:
        # Autocommit, so each reply is on disk as soon as it is stored; a long timeout waits out
        # other processes writing to the same file.
        return sqlite3.connect(self.cache_path, timeout=60, isolation_level=None)

    def _init_cache(self) -> None:
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            connection = self._connect()
            try:
                connection.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
                connection.execute(
                    "CREATE TABLE IF NOT EXISTS judge_replies ("
                    " key TEXT PRIMARY KEY, judge TEXT NOT NULL, model TEXT NOT NULL, prompt_sha256 TEXT NOT NULL,"
                    " reply TEXT NOT NULL, created REAL NOT NULL)"
                )
            finally:
                connection.close()
        except sqlite3.DatabaseError as error:
            if isinstance(error, sqlite3.OperationalError) and "locked" in str(error):
                raise  # another process holds it: not a broken file
            path = self.cache_path
            raise JudgeCacheError(
                f"The {self.name} judge cache {path} is not a usable sqlite database ({error}). Move it aside "
                f"(`mv {path} {path}.bad`, with any {path.name}-wal / -shm beside it) or set "
                f"eval.judges.{self.name}.cache_path to another file; the judge then starts a new cache."
            ) from error

    def _lookup(self, connection: sqlite3.Connection, keys: set[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        keys_list = sorted(keys)
        for start in range(0, len(keys_list), 500):  # stay below sqlite's bound-parameter limit
            chunk = keys_list[start : start + 500]
            rows = connection.execute(
                f"SELECT key, reply FROM judge_replies WHERE key IN ({','.join('?' * len(chunk))})", chunk
            )
            found.update(dict(rows))
        return found

    def _store(self, connection: sqlite3.Connection, key: str, reply: str) -> None:
        connection.execute(
            "INSERT OR REPLACE INTO judge_replies (key, judge, model, prompt_sha256, reply, created)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (key, self.judge_id, self.model, self.prompt.sha256, reply, time.time()),
        )

    def _check_item(self, index: int, item: Any) -> tuple[str, str]:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            raise TypeError(f"Item {index} of {type(self).__name__}.judge must be a (prompt, answer) pair of "
                            f"strings, got {type(item).__name__}.")
        return item[0], item[1]


def _retry_after_seconds(value: str | None) -> float | None:
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


