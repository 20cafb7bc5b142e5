"""Where every evaluation answer comes from: the local model, or any OpenAI-compatible server.

``eval.generation.backend`` picks the backend once per evaluation; the harmful prompt sets
(:func:`sdd.evaluation.run.evaluate`) and the benign ones (:mod:`sdd.evaluation.benign`) both get their
answers from :func:`generate_answers`. Decoding is greedy in both backends.

- ``local`` (default): :func:`sdd.generation.generate`, batched on ``eval.device``.
- ``openai``: one request per prompt to an OpenAI-compatible server, e.g. ``vllm serve <model folder>``,
  through the client the LLM judges use (:mod:`sdd.openai_api`: bounded concurrency, retries with
  backoff on connection errors, 429 and 5xx honouring ``Retry-After``, a one-line stop on 401/403/404).

  - ``api: completions`` sends the prompt as text, rendered here with the backbone's chat template by
    :func:`sdd.chat.render` (the text whose tokens :func:`sdd.chat.tokenize_prompt` gives the local
    path), with ``add_special_tokens: false`` so that the server adds no second BOS.
  - ``api: chat`` sends the conversation as messages; the server renders them with the model folder's
    own template, so it is refused when the local path would use another (the fallback template of a
    base model, or ``backbone.chat_template``).

  Greedy settings are the local path's: ``temperature: 0``, ``max_tokens`` = ``max_new_tokens``, and its
  stop tokens (the generation config's and the tokenizer's EOS ids) as ``stop_token_ids`` (a vLLM and
  SGLang field; with ``vllm_fields: false`` their texts go as ``stop`` strings instead). Answers are
  stripped like the local path's.

  Every answer is stored in an sqlite cache keyed by (API route, model name, a fingerprint of the local
  model folder's weight files, the whole request body: prompt or messages, max_tokens, temperature,
  stop tokens), as soon as it arrives: an interrupted evaluation resumes with the missing prompts only,
  and a model retrained into the same folder never reuses the old answers.

Likelihood computations (the benign reference NLL, capability benchmarks, gradient separation) need
the weights, not answers: with ``backend: openai`` they still run locally, and the evaluation loads the
model only when one of them is enabled (:func:`needs_local_model`).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Protocol, Sequence

from sdd.chat import FALLBACK_CHAT_TEMPLATE, Conversation, render, user_turn
from sdd.errors import ConfigError, UserError
from sdd.openai_api import (
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

BACKENDS = ("local", "openai")
APIS = {"completions": "completions", "chat": "chat/completions"}
CONFIG_KEY = "eval.generation.openai"
# OpenAI's API takes at most four stop strings; vLLM takes any number of stop token ids.
MAX_STOP_STRINGS = 4


class GenerationEndpointError(EndpointError):
    """The generation endpoint is down, or refused the path or the model; answers so far are cached."""


class GenerationAuthenticationError(GenerationEndpointError, EndpointAuthenticationError):
    """The generation endpoint rejected the key (HTTP 401/403)."""


class GenerationRequestError(UserError, RuntimeError):
    """The endpoint rejected some prompts for themselves (e.g. HTTP 400) or answered them malformed."""


class GenerationCacheError(ReplyCacheError):
    """The generation cache file is not an sqlite database."""


class AnswerGenerator(Protocol):
    """A generation backend: greedy answers to single-turn prompts, in input order."""

    def generate(
        self, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int, system_prompt: str | None, progress: bool
    ) -> list[str]: ...

    def describe(self) -> dict[str, Any]: ...


def generate_answers(
    generator: AnswerGenerator,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    system_prompt: str | None = None,
    progress: bool = True,
) -> list[str]:
    """Greedy answers to ``prompts`` from the evaluation's backend (every evaluation answer comes from here).

    Args:
        generator: the evaluation's backend, :class:`LocalGenerator` or :class:`OpenAIGenerator`.
        prompts: single-turn user prompts.
        max_new_tokens: most tokens per answer.
        batch_size: prompts per forward pass of the local backend (a server batches on its own).
        system_prompt: an optional system message before each prompt.
        progress: show a progress bar.

    Returns:
        One answer per prompt, in input order.
    """
    answers = generator.generate(
        list(prompts),
        max_new_tokens=int(max_new_tokens),
        batch_size=int(batch_size),
        system_prompt=system_prompt,
        progress=progress,
    )
    if len(answers) != len(prompts):  # a backend bug, never the user's
        raise RuntimeError(f"{type(generator).__name__} returned {len(answers)} answers for {len(prompts)} prompts.")
    return answers


class LocalGenerator:
    """The local backend: :func:`sdd.generation.generate` on a loaded model."""

    def __init__(self, model, tokenizer, device: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device

    def generate(
        self, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int, system_prompt: str | None, progress: bool
    ) -> list[str]:
        from sdd.generation import generate

        return generate(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            system_prompt=system_prompt,
            progress=progress,
        )

    def describe(self) -> dict[str, Any]:
        return {"backend": "local", "decoding": "greedy", "device": self.device}


class OpenAIGenerator:
    """Greedy answers from an OpenAI-compatible server (``/completions`` or ``/chat/completions``).

    Args:
        tokenizer: the backbone's tokenizer, with the chat template the local path uses.
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1`` (``vllm serve``'s default).
        model: the name the server knows the model by (vLLM: the folder given to ``vllm serve``, or
            ``--served-model-name``).
        api: ``completions`` (the prompt rendered here, as the local path does) or ``chat`` (messages).
        stop_token_ids: the local path's stop tokens (see :func:`local_stop_token_ids`).
        vllm_fields: send ``stop_token_ids`` (and, for ``completions``, ``add_special_tokens: false``),
            fields of vLLM and SGLang; False sends the stop tokens' texts as ``stop`` strings instead,
            for servers that reject unknown fields.
        api_key_env: NAME of the environment variable holding the key (vLLM's own: ``VLLM_API_KEY``).
        allow_missing_key: accept an unset key (a server started without ``--api-key``).
        cache_path: sqlite file of answers.
        model_fingerprint: a digest of the local model folder's weights (enters every cache key), or None.
        max_retries, backoff_seconds, timeout_seconds, max_concurrency: see :class:`sdd.openai_api.RetrySettings`.

    Raises:
        ConfigError: an unknown ``api``, no model name, an unset key (unless allowed), settings out of range.
        GenerationCacheError: ``cache_path`` is not an sqlite database.
    """

    def __init__(
        self,
        tokenizer,
        base_url: str,
        model: str,
        api: str = "completions",
        stop_token_ids: Sequence[int] = (),
        vllm_fields: bool = True,
        api_key_env: str = "VLLM_API_KEY",
        allow_missing_key: bool = True,
        cache_path: str | Path = "openai_generations.sqlite",
        model_fingerprint: str | None = None,
        max_retries: int = 5,
        backoff_seconds: float = 1.0,
        timeout_seconds: float = 600.0,
        max_concurrency: int = 32,
    ) -> None:
        if api not in APIS:
            raise ConfigError(
                f"{CONFIG_KEY}.api must be one of {sorted(APIS)}, got '{api}'. completions sends the "
                "prompt rendered with the model's chat template (as the local path); chat sends messages."
            )
        if not base_url or not model:
            raise ConfigError(
                f"The generation backend needs {CONFIG_KEY}.base_url and {CONFIG_KEY}.model (the name the server "
                "knows the model by: for `vllm serve <folder>`, that folder as written, or --served-model-name)."
            )
        settings = RetrySettings(int(max_retries), float(backoff_seconds), float(timeout_seconds), int(max_concurrency))
        if problem := settings.problem():
            raise ConfigError(f"{CONFIG_KEY} needs {problem}.")
        key = read_api_key(api_key_env)
        if not key and not allow_missing_key:
            raise ConfigError(
                f"The generation backend needs an API key in the environment variable {api_key_env}, which is unset "
                f"or empty. Fix: `export {api_key_env}=...` (the key given to `vllm serve --api-key`), or set "
                f"{CONFIG_KEY}.allow_missing_key=true for a server that needs none."
            )
        self.tokenizer = tokenizer
        self.model = str(model)
        self.api = api
        self.api_key_env = api_key_env
        self.vllm_fields = bool(vllm_fields)
        self.stop_token_ids = sorted({int(i) for i in stop_token_ids})
        self.model_fingerprint = model_fingerprint
        self._client = EndpointClient(base_url, APIS[api], key, settings, label="generation")
        self._cache = ReplyCache(
            cache_path,
            "generations",
            ("model", "route"),
            owner="generation backend",
            config_key=f"{CONFIG_KEY}.cache_path",
            error=GenerationCacheError,
        )
        self.cache_path = self._cache.path
        self.url = self._client.url

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(url={redact_url(self.url)!r}, model={self.model!r}, api={self.api!r}, "
            f"cache_path={str(self.cache_path)!r})"
        )

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "openai",
            "decoding": "greedy",
            "endpoint": redact_url(self.url),
            "model": self.model,
            "api": self.api,
            "stop_token_ids": self.stop_token_ids,
            "vllm_fields": self.vllm_fields,
            "cache_path": str(self.cache_path),
        }

    def request_body(self, conversation: Conversation, max_new_tokens: int) -> dict[str, Any]:
        """The JSON body asking for the greedy answer to one conversation (ending with a user turn)."""
        body: dict[str, Any] = {"model": self.model}
        if self.api == "completions":
            body["prompt"] = render(self.tokenizer, conversation, add_generation_prompt=True)
        else:
            body["messages"] = [dict(message) for message in conversation]
        body.update(max_tokens=int(max_new_tokens), temperature=0.0, n=1)
        if self.vllm_fields:
            body["stop_token_ids"] = self.stop_token_ids
            if self.api == "completions":
                body["add_special_tokens"] = False  # the template wrote the special tokens already
            body["skip_special_tokens"] = True  # as the local path decodes
        elif stops := self._stop_strings():
            body["stop"] = stops
        return body

    def cache_key(self, body: Mapping[str, Any]) -> str:
        """sha256 of (route, model folder fingerprint, request body); the body holds model, prompt and sampling."""
        return stable_key(["generation", self._client.route, self.model_fingerprint, dict(body)])

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int,
        batch_size: int = 1,
        system_prompt: str | None = None,
        progress: bool = True,
    ) -> list[str]:
        """Greedy answers to ``prompts``, in input order; cached answers cost no request.

        Raises:
            GenerationAuthenticationError: the server rejected the key (401/403), raised at once.
            GenerationEndpointError: 404 (unknown path or model), or the server stayed down after the
                retries. Answers obtained so far are cached: a re-run requests only the missing ones.
            GenerationRequestError: the server rejected some prompts (e.g. HTTP 400, prompt too long).
        """
        bodies = [self.request_body(user_turn(prompt, system_prompt), max_new_tokens) for prompt in prompts]
        keys = [self.cache_key(body) for body in bodies]
        connection = self._cache.connect()
        try:
            cached = self._cache.lookup(connection, set(keys))
            todo: dict[str, dict[str, Any]] = {}  # one request per distinct prompt
            for key, body in zip(keys, bodies):
                if key not in cached:
                    todo.setdefault(key, body)
            log.info(
                "Generation through %s (model %s, %s): %d prompts, %d cached, %d to request.",
                redact_url(self.url),
                self.model,
                self.api,
                len(keys),
                sum(k in cached for k in keys),
                len(todo),
            )
            result = self._client.post_all(
                todo,
                on_reply=lambda key, reply: self._cache.store(
                    connection, key, reply, model=self.model, route=self._client.route
                ),
                progress="Generating (openai)" if progress else None,
            )
        finally:
            connection.close()

        num_done = sum(key in cached or key in result.replies for key in keys)
        resume = (
            f"{num_done} of {len(keys)} answers are cached in {self.cache_path} ({len(result.replies)} in this "
            "call); re-running the evaluation requests only the missing ones."
        )
        if result.stopped:
            if result.unexpected is not None:
                raise result.unexpected
            raise self._client.failure(
                result,
                who="generation",
                config_key=CONFIG_KEY,
                model=self.model,
                model_noun="model",
                api_key_env=self.api_key_env,
                resume=resume,
                num_done=num_done,
                num_total=len(keys),
                endpoint_error=GenerationEndpointError,
                authentication_error=GenerationAuthenticationError,
                model_hint=" (vLLM serves `vllm serve <folder>` as that folder, as written, or as --served-model-name)",
                down_hint="Fix: start the server (e.g. `vllm serve <model folder>`) "
                f"or point {CONFIG_KEY}.base_url at it.",
            )
        if result.errors:
            first = next(iter(result.errors.values()))
            raise GenerationRequestError(
                f"The generation endpoint {redact_url(self.url)} rejected {len(result.errors)} of {len(todo)} requests "
                f"({shorten(first, 200)}). Fix: a prompt longer than the server's context (vllm serve --max-model-len, "
                "or eval.harmfulness.max_new_tokens), or a field the server does not take "
                f"({CONFIG_KEY}.vllm_fields=false "
                f"for servers other than vLLM and SGLang). {resume}"
            )
        return [(cached[key] if key in cached else result.replies[key]).strip() for key in keys]

    def _stop_strings(self) -> list[str]:
        texts = [self.tokenizer.decode([token]) for token in self.stop_token_ids]
        return [text for text in dict.fromkeys(texts) if text][:MAX_STOP_STRINGS]


# ---------------------------------------------------------------------------------------- choosing

# How requests travel, not what they compute: left out of a pipeline stage's hash.
TRANSPORT_SETTINGS = (
    "api_key_env",
    "allow_missing_key",
    "cache_path",
    "max_concurrency",
    "max_retries",
    "backoff_seconds",
    "timeout_seconds",
)


def drop_unhashed_generation_settings(config: dict[str, Any]) -> None:
    """Remove from a resolved stage config (in place) the generation settings that change no answer.

    With ``backend: local`` the server block computes nothing, so the whole ``eval.generation`` block goes
    (an evaluation stage keeps the hash it had before the block existed); with ``openai`` the transport
    settings go (:data:`TRANSPORT_SETTINGS`), and what decides the answers stays (backend, endpoint,
    model, api, vllm_fields).
    """
    evaluation = config.get("eval")
    generation = evaluation.get("generation") if isinstance(evaluation, dict) else None
    if not isinstance(generation, dict):
        return
    if generation.get("backend", "local") == "local":
        evaluation.pop("generation")
    elif isinstance(generation.get("openai"), dict):
        for key in TRANSPORT_SETTINGS:
            generation["openai"].pop(key, None)


def backend_of(eval_config: Mapping[str, Any]) -> str:
    """The configured backend (``eval.generation.backend``; ``local`` when the block is absent).

    Raises:
        ConfigError: not one of :data:`BACKENDS`.
    """
    generation = eval_config.get("generation") or {}
    backend = generation.get("backend", "local") or "local"
    if backend not in BACKENDS:
        raise ConfigError(
            f"eval.generation.backend must be one of {', '.join(BACKENDS)}, got '{backend}'. local: the "
            "model on eval.device; openai: an OpenAI-compatible server (eval.generation.openai)."
        )
    return backend


def needs_local_model(eval_config: Mapping[str, Any]) -> bool:
    """True when the evaluation needs the weights here: local generation, or a likelihood computation
    (benign reference NLL, capability, gradient separation)."""

    def enabled(node: Any) -> bool:
        return node is not None and bool(node.get("enabled", False))

    benign = eval_config.get("benign")
    reference_nll = (
        enabled(benign)
        and bool((benign.get("reference_nll") or {}).get("enabled", True))
        and any(source is not None for source in (benign.get("prompt_sets") or {}).values())
    )
    return (
        backend_of(eval_config) == "local"
        or reference_nll
        or enabled(eval_config.get("capability"))
        or enabled(eval_config.get("gradient_separation"))
    )


def build_openai_generator(config: Mapping[str, Any], backbone, tokenizer) -> OpenAIGenerator:
    """The ``openai`` backend of ``eval.generation.openai`` for the evaluated backbone.

    Stop tokens and the cache fingerprint come from the backbone's local folder (tokenizer, generation
    config, weight files); no weights are loaded.

    Raises:
        ConfigError: ``api: chat`` while the local path renders with another template than the folder's.
    """
    options = dict(config)
    location = backbone.resolve()
    if options.get("api", "completions") == "chat":
        if backbone.chat_template not in (None, "fallback") or tokenizer.chat_template == FALLBACK_CHAT_TEMPLATE:
            source = (
                "backbone.chat_template overrides the model's template"
                if backbone.chat_template not in (None, "fallback")
                else "the model has no chat template (the fallback template is used)"
            )
            raise ConfigError(
                f"{CONFIG_KEY}.api=chat lets the server render the prompt with the model folder's own chat template, "
                f"but {source}, so the server would not see the prompt the model is evaluated on. Fix: "
                f"{CONFIG_KEY}.api=completions (the prompt rendered here, as the local path does)."
            )
    return OpenAIGenerator(
        tokenizer,
        stop_token_ids=local_stop_token_ids(tokenizer, location, backbone.trust_remote_code),
        model_fingerprint=folder_fingerprint(location),
        **options,
    )


def local_stop_token_ids(tokenizer, location: str, trust_remote_code: bool = False) -> list[int]:
    """The stop tokens of the local path (:mod:`sdd.generation`) for the model at ``location``, without its weights."""
    from transformers import AutoConfig, GenerationConfig

    from sdd.generation import stop_token_ids

    try:
        generation_config = GenerationConfig.from_pretrained(location)
    except OSError:  # no generation_config.json: transformers derives one from config.json, as on loading
        generation_config = GenerationConfig.from_model_config(
            AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
        )
    return list(stop_token_ids(tokenizer, SimpleNamespace(generation_config=generation_config)))


def folder_fingerprint(location: str) -> str | None:
    """A digest of a local model folder's config and weight files (names, sizes, modification times);
    None for a Hub id. A model retrained into the same folder gets another fingerprint."""
    folder = Path(location).expanduser()
    if not folder.is_dir():
        return None
    entries = sorted(
        (path.name, path.stat().st_size, path.stat().st_mtime_ns)
        for path in folder.iterdir()
        if path.is_file() and (path.suffix in (".safetensors", ".bin", ".pt") or path.name == "config.json")
    )
    return hashlib.sha256(repr(entries).encode("utf-8")).hexdigest()[:16]
