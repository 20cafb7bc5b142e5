"""The shared path of every LLM judge: a prompt template, an OpenAI-compatible client, an sqlite cache.

A judge is :class:`ChatJudge` plus a template file (``judge_prompts/``) and a reply parser: the HEx-PHI
rubric (:mod:`sdd.evaluation.rubric_judge`) and StrongREJECT (:mod:`sdd.evaluation.strongreject`).
The client (:mod:`sdd.openai_api`, shared with the generation backend) talks to any ``/chat/completions``
endpoint (OpenAI, a local vLLM server, ...), retries connection errors, timeouts, 429 and 5xx with
backoff, and keeps every reply it got in an sqlite cache
keyed by (judge, judge model, SHA-256 of the template, prompt, answer): an interrupted or repeated run
never pays twice, and a changed template never reuses scores given under another. Replies are stored
raw and parsed when read, so a parser fix applies to cached replies too.

A rejected key (HTTP 401/403) or an unknown endpoint or model (404) stops the judge at once; an
endpoint that stays down stops it after the retries; in both cases everything judged so far is cached
and a re-run resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Mapping, Sequence, TypeVar

from sdd.errors import UserError
from sdd.openai_api import (  # noqa: F401  (redact_url, shorten: re-exported for the judges' modules)
    EndpointAuthenticationError,
    EndpointClient,
    EndpointError,
    ReplyCache,
    ReplyCacheError,
    RetrySettings,
    read_api_key,
    redact_url,
    shorten,
    stable_key,
)

log = logging.getLogger(__name__)

PROMPTS_DIR = Path(__file__).with_name("judge_prompts")

_ITEM_PLACEHOLDER = re.compile(r"\{(instruction|prompt|response)\}")


class JudgeConfigError(UserError, ValueError):
    """The judge is misconfigured (unset key variable, bad template, ...); nothing was sent."""


class JudgeError(UserError, RuntimeError):
    """A judge could not deliver its verdicts; the message names the cause and the fix."""


class JudgeEndpointError(JudgeError, EndpointError):
    """The endpoint failed (down after all retries, or fatal); every verdict obtained so far is cached.

    Attributes:
        url: the chat-completions URL (credentials removed).
        num_done: items of the failed call that now have a verdict in the cache.
        num_total: items in the failed call.
    """


class JudgeAuthenticationError(JudgeEndpointError, EndpointAuthenticationError):
    """The endpoint rejected the key (HTTP 401/403): fixed by the key, not by retrying."""


class JudgeCacheError(JudgeError, ReplyCacheError):
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
        raise JudgeConfigError(
            f"Judge prompt file {path} is empty. Point the judge at a template with {{instruction}} and {{response}}."
        )
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
    def load(
        cls,
        prompt_file: str | os.PathLike,
        system_prompt_file: str | os.PathLike | None = None,
        fill: Mapping[str, str] | None = None,
    ) -> "JudgePrompt":
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
        return cls(
            user=user,
            system=system,
            prompt_file=str(prompt_file),
            system_prompt_file=str(system_prompt_file) if system_prompt_file else None,
        )

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


V = TypeVar("V")


class ChatJudge(Generic[V]):
    """An LLM judge over an OpenAI-compatible API; subclasses give the template and the parser.

    Subclasses set ``name`` (its default config key, used in messages) and ``judge_id`` (enters the
    cache key), and implement :meth:`parse_reply` (reply text -> verdict) and :meth:`failed_verdict`
    (request error -> verdict). Verdicts are dataclasses with ``cached`` and ``error`` fields. Requests,
    retries and the cache are :mod:`sdd.openai_api`'s, shared with the generation backend.

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
            raise JudgeConfigError(
                f"The {self.name} judge needs a base_url and a model name (eval.judges.{self.name}.base_url, .model)."
            )
        settings = RetrySettings(int(max_retries), float(backoff_seconds), float(timeout_seconds), int(max_concurrency))
        if problem := settings.problem():
            raise JudgeConfigError(f"The {self.name} judge needs {problem}.")
        key = read_api_key(api_key_env)
        if not key and not allow_missing_key:
            raise JudgeConfigError(
                f"The {self.name} judge needs an API key in the environment variable {api_key_env}, which is "
                f"unset or empty. Fix: `export {api_key_env}=...` before running (or set the judge's "
                "allow_missing_key for a local server that needs no key), or keep the judges offline "
                f"only (disable this judge, e.g. eval.judges.{self.name}.enabled=false)."
            )
        self.api_key_env = api_key_env
        self.prompt = prompt
        self._client = EndpointClient(base_url, "chat/completions", key, settings, label=f"{self.name} judge")
        self.base_url = self._client.base_url
        self.url = self._client.url
        self.model = model
        self.max_retries = settings.max_retries
        self.backoff_seconds = settings.backoff_seconds
        self.timeout_seconds = settings.timeout_seconds
        self.max_concurrency = settings.max_concurrency
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self._cache = ReplyCache(
            cache_path,
            "judge_replies",
            ("judge", "model", "prompt_sha256"),
            owner=f"{self.name} judge",
            config_key=f"eval.judges.{self.name}.cache_path",
            error=JudgeCacheError,
        )
        self.cache_path = self._cache.path

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(url={redact_url(self.url)!r}, model={self.model!r}, "
            f"prompt_file={self.prompt.prompt_file!r}, cache_path={str(self.cache_path)!r})"
        )

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
        connection = self._cache.connect()
        try:
            cached = self._cache.lookup(connection, set(keys))
            todo: dict[str, dict[str, Any]] = {}  # one request per distinct pair
            for key, (prompt, answer) in zip(keys, items):
                if key not in cached and key not in todo:
                    todo[key] = self._request_body(prompt, answer)
            log.info(
                "%s judge %s at %s: %d items, %d cached, %d to request.",
                self.name,
                self.model,
                redact_url(self.url),
                len(items),
                sum(k in cached for k in keys),
                len(todo),
            )
            result = self._client.post_all(
                todo,
                on_reply=lambda key, reply: self._cache.store(
                    connection, key, reply, judge=self.judge_id, model=self.model, prompt_sha256=self.prompt.sha256
                ),
                progress=f"Judging ({self.name})",
            )
        finally:
            connection.close()

        if result.stopped:
            if result.unexpected is not None:
                raise result.unexpected
            # Failed verdicts are not cached, so they do not count as done.
            num_done = sum(key in cached or key in result.replies for key in keys)
            resume = (
                f"{num_done} of {len(items)} items are judged and cached in {self.cache_path} "
                f"({len(result.replies)} in this call); re-running resumes from the cache."
            )
            raise self._client.failure(
                result,
                who=f"{self.name} judge",
                config_key=f"eval.judges.{self.name}",
                model=self.model,
                model_noun="judge model",
                api_key_env=self.api_key_env,
                resume=resume,
                num_done=num_done,
                num_total=len(items),
                endpoint_error=JudgeEndpointError,
                authentication_error=JudgeAuthenticationError,
            )
        verdicts = []
        for key in keys:
            if key in cached:
                verdicts.append(dataclasses.replace(self.parse_reply(cached[key]), cached=True))
            elif key in result.errors:
                verdicts.append(self.failed_verdict(result.errors[key]))
            else:
                verdicts.append(self.parse_reply(result.replies[key]))
        return verdicts

    def cache_key(self, prompt: str, answer: str) -> str:
        """sha256 of (judge, judge model, template SHA-256, prompt, answer)."""
        return stable_key([self.judge_id, self.model, self.prompt.sha256, prompt, answer])

    def _request_body(self, prompt: str, answer: str) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": self.prompt.messages(prompt, answer),
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }

    def _check_item(self, index: int, item: Any) -> tuple[str, str]:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            raise TypeError(
                f"Item {index} of {type(self).__name__}.judge must be a (prompt, answer) pair of "
                f"strings, got {type(item).__name__}."
            )
        return item[0], item[1]
