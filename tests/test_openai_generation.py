"""Generation through an OpenAI-compatible server (eval.generation.backend=openai), against a local fake
server (tests/judge_endpoint.py: /v1/completions and /v1/chat/completions on 127.0.0.1, no network)."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import compose_config
from judge_endpoint import FAKE_KEY, KEY_ENV, Reply, endpoint, fail_after, fail_first  # noqa: F401

from sdd.chat import render, tokenize_prompt, user_turn
from sdd.cli import user_message
from sdd.errors import ConfigError
from sdd.evaluation.generation import (
    GenerationAuthenticationError,
    GenerationEndpointError,
    GenerationRequestError,
    OpenAIGenerator,
    build_openai_generator,
    generate_answers,
    needs_local_model,
)

PROMPTS = [f"Tell me about topic number {i}." for i in range(10)]


NUMBER = re.compile(r"topic number (\d+)")


def numbered_answer(text: str) -> Reply:
    """An answer naming the prompt's number (with spaces around it, which the backend strips)."""
    return Reply(content=f"  Answer {NUMBER.search(text).group(1)}.\n")


def expected(prompts=PROMPTS) -> list[str]:
    return [f"Answer {NUMBER.search(p).group(1)}." for p in prompts]


@pytest.fixture
def make_generator(endpoint, tmp_path, tiny_backbone, tiny_tokenizer):  # noqa: F811
    """A generator of the fake server for the tiny backbone, tiny backoff, a per-test cache file."""
    endpoint.respond = numbered_answer

    def make(**overrides) -> OpenAIGenerator:
        options = dict(
            base_url=endpoint.url,
            model="served-model",
            api="completions",
            vllm_fields=True,
            api_key_env=KEY_ENV,
            allow_missing_key=True,
            cache_path=tmp_path / "generations.sqlite",
            max_concurrency=4,
            max_retries=2,
            backoff_seconds=0.01,
            timeout_seconds=5,
        )
        options.update(overrides)
        return build_openai_generator(options, tiny_backbone, tiny_tokenizer)

    return make


def answers_of(generator, prompts=PROMPTS, max_new_tokens=8, system_prompt=None) -> list[str]:
    return generate_answers(
        generator, prompts, max_new_tokens=max_new_tokens, batch_size=4, system_prompt=system_prompt, progress=False
    )


def test_completion_prompt_is_the_local_paths_rendering_with_its_greedy_settings(
    endpoint, make_generator, tiny_backbone, tiny_tokenizer
):  # noqa: F811
    from sdd.generation import stop_token_ids

    answers = answers_of(make_generator(max_concurrency=1), PROMPTS[:2], max_new_tokens=7, system_prompt="Be brief.")
    assert answers == expected(PROMPTS[:2])
    model = tiny_backbone.load_model()
    for prompt, request in zip(PROMPTS[:2], endpoint.requests):
        body = request["body"]
        assert request["path"] == "/v1/completions"
        conversation = user_turn(prompt, "Be brief.")
        assert body["prompt"] == render(tiny_tokenizer, conversation, add_generation_prompt=True)
        # The server tokenizes the text as the local path does: no special token added.
        assert body["add_special_tokens"] is False
        assert tiny_tokenizer(body["prompt"], add_special_tokens=False)["input_ids"] == tokenize_prompt(
            tiny_tokenizer, conversation
        )
        assert (body["model"], body["max_tokens"], body["temperature"], body["n"]) == ("served-model", 7, 0.0, 1)
        assert body["stop_token_ids"] == stop_token_ids(tiny_tokenizer, model)  # the local path's stop tokens
        assert body["skip_special_tokens"] is True and "stop" not in body


def test_answers_equal_the_local_path_when_the_server_decodes_with_the_request(
    endpoint, make_generator, tiny_backbone, tiny_tokenizer
):  # noqa: F811
    """A server that decodes greedily with what the request carries gives the local path's answers."""
    import torch

    from sdd.generation import generate

    model = tiny_backbone.load_model().eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights that say something, and stop early at times (the initial ones print newlines)
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
        model.get_output_embeddings().weight[tiny_tokenizer.eos_token_id] *= 2.5
    lock = threading.Lock()

    def decode(body: dict) -> Reply:  # what vLLM does with these fields, on the same weights
        ids = tiny_tokenizer(body["prompt"], add_special_tokens=body["add_special_tokens"])["input_ids"]
        with lock, torch.no_grad():
            output = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=body["max_tokens"],
                do_sample=False,
                eos_token_id=body["stop_token_ids"],
                pad_token_id=tiny_tokenizer.pad_token_id,
            )
        return Reply(
            content=tiny_tokenizer.decode(output[0, len(ids) :], skip_special_tokens=body["skip_special_tokens"])
        )

    endpoint.respond_body = decode
    prompts = [
        "Why is the sky blue?",
        "Name a prime number.",
        "How do plants make food?",
        "What is rain?",
        "Say hi.",
        "Count to three.",
    ]
    remote = answers_of(make_generator(max_concurrency=2), prompts, max_new_tokens=12)
    local = generate(model, tiny_tokenizer, prompts, max_new_tokens=12, batch_size=1)
    assert remote == local
    lengths = [len(tiny_tokenizer(answer, add_special_tokens=False)["input_ids"]) for answer in local]
    assert any(0 < n < 8 for n in lengths) and max(lengths) >= 8  # some stopped at the end-of-turn token


def test_answers_come_back_in_input_order_under_concurrency(endpoint, make_generator):  # noqa: F811
    endpoint.delay = 0.05
    assert answers_of(make_generator(max_concurrency=3)) == expected()
    assert endpoint.count == len(PROMPTS)
    assert 2 <= endpoint.max_in_flight <= 3  # parallel, never above the limit


@pytest.mark.parametrize("status, headers", [(500, {}), (503, {}), (429, {"Retry-After": "0.4"})])
def test_retries_server_errors_and_rate_limits_then_answers(endpoint, make_generator, status, headers):  # noqa: F811
    endpoint.respond = fail_first(1, status, then=numbered_answer, **headers)
    started = time.monotonic()
    assert answers_of(make_generator(max_concurrency=1, backoff_seconds=0.001), PROMPTS[:2]) == expected(PROMPTS[:2])
    assert endpoint.count == 3  # one failure, retried
    if headers:
        assert time.monotonic() - started >= 0.4  # the header's pause, not the 1 ms backoff


def test_a_second_run_is_served_from_the_cache(endpoint, make_generator):  # noqa: F811
    answers_of(make_generator())
    assert endpoint.count == len(PROMPTS)
    assert answers_of(make_generator()) == expected()  # a new generator on the same file, as a new process
    assert endpoint.count == len(PROMPTS)
    # The key holds the model and the sampling settings: either changed asks again.
    answers_of(make_generator(model="other-model"), PROMPTS[:1])
    answers_of(make_generator(), PROMPTS[:1], max_new_tokens=9)
    answers_of(make_generator(), PROMPTS[:1], system_prompt="Be brief.")
    assert endpoint.count == len(PROMPTS) + 3


def test_an_interrupted_run_resumes_with_the_missing_prompts_only(endpoint, make_generator):  # noqa: F811
    endpoint.respond = fail_after(4, 503, then=numbered_answer)  # the server dies after four answers
    with pytest.raises(GenerationEndpointError) as caught:
        answers_of(make_generator(max_concurrency=3, max_retries=1))
    assert (caught.value.num_done, caught.value.num_total) == (4, len(PROMPTS))
    message = str(caught.value)
    assert "down or unreachable" in message and "4 of 10 answers are cached" in message and "\n" not in message
    assert "Fix: start the server" in message and "eval.generation.openai.base_url" in message
    answered = {r["body"]["prompt"] for r in endpoint.requests[:4]}

    endpoint.requests.clear()
    endpoint.respond = numbered_answer  # the server is back
    assert answers_of(make_generator(max_concurrency=3)) == expected()
    asked = [r["body"]["prompt"] for r in endpoint.requests]
    assert len(asked) == len(PROMPTS) - 4 and not answered & set(asked)  # only the missing ones


@pytest.mark.parametrize("status", [401, 403])
def test_a_rejected_key_stops_at_once_in_one_line(endpoint, make_generator, monkeypatch, status):  # noqa: F811
    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    endpoint.respond = lambda text: Reply(status=status, raw=f'{{"error": "invalid key {FAKE_KEY}"}}')
    with pytest.raises(GenerationAuthenticationError) as caught:
        answers_of(make_generator(max_concurrency=1, max_retries=3))
    assert endpoint.count == 1  # no retry, no other prompt
    assert endpoint.requests[0]["headers"]["Authorization"] == f"Bearer {FAKE_KEY}"
    line = user_message(caught.value)  # what the entry points print
    assert line is not None and "\n" not in line and FAKE_KEY not in line
    assert f"HTTP {status}" in line and f"check the key in ${KEY_ENV}" in line and "0 of 10" in line


def test_an_unknown_model_names_the_setting(endpoint, make_generator):  # noqa: F811
    endpoint.respond = lambda text: Reply(status=404, raw='{"error": "model not found"}')
    with pytest.raises(GenerationEndpointError, match=r"check eval\.generation\.openai\.base_url .* 'served-model'"):
        answers_of(make_generator(max_concurrency=1))
    assert endpoint.count == 1


def test_a_rejected_prompt_fails_after_caching_the_others(endpoint, make_generator):  # noqa: F811
    endpoint.respond = lambda text: (
        Reply(status=400, raw='{"error": "prompt too long"}') if "number 3" in text else numbered_answer(text)
    )
    with pytest.raises(GenerationRequestError, match=r"rejected 1 of 10 requests \(HTTP 400.*9 of 10 answers"):
        answers_of(make_generator())
    assert endpoint.count == len(PROMPTS)  # a 400 is not retried
    endpoint.respond = numbered_answer
    assert answers_of(make_generator()) == expected() and endpoint.count == len(PROMPTS) + 1


def test_missing_required_key_is_a_config_error(make_generator, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"export {KEY_ENV}=.*allow_missing_key=true"):
        make_generator(allow_missing_key=False)


def test_unset_key_sends_no_authorization(endpoint, make_generator, monkeypatch):  # noqa: F811
    monkeypatch.delenv(KEY_ENV, raising=False)
    answers_of(make_generator(), PROMPTS[:1])
    assert "authorization" not in {name.lower() for name in endpoint.requests[0]["headers"]}


def test_chat_api_sends_the_conversation_as_messages(endpoint, make_generator):  # noqa: F811
    answers = answers_of(make_generator(api="chat", max_concurrency=1), PROMPTS[:2], system_prompt="Be brief.")
    assert answers == expected(PROMPTS[:2])
    request = endpoint.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["body"]["messages"] == user_turn(PROMPTS[0], "Be brief.")
    assert "prompt" not in request["body"] and "add_special_tokens" not in request["body"]


def test_chat_api_is_refused_when_the_local_template_is_not_the_folders(tiny_backbone, tiny_tokenizer, tmp_path):
    override = SimpleNamespace(
        resolve=tiny_backbone.resolve,
        trust_remote_code=False,
        chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}",
    )
    with pytest.raises(ConfigError, match="api=completions"):
        build_openai_generator(
            {"base_url": "http://127.0.0.1:9/v1", "model": "m", "api": "chat", "cache_path": tmp_path / "c.sqlite"},
            override,
            tiny_tokenizer,
        )
    with pytest.raises(ConfigError, match="must be one of"):
        build_openai_generator(
            {
                "base_url": "http://127.0.0.1:9/v1",
                "model": "m",
                "api": "responses",
                "cache_path": tmp_path / "c.sqlite",
            },
            tiny_backbone,
            tiny_tokenizer,
        )


def test_without_vllm_fields_the_stop_tokens_go_as_stop_strings(endpoint, make_generator, tiny_tokenizer):  # noqa: F811
    answers_of(make_generator(vllm_fields=False), PROMPTS[:1])
    body = endpoint.requests[0]["body"]
    assert "stop_token_ids" not in body and "add_special_tokens" not in body
    assert body["stop"] == [tiny_tokenizer.eos_token] == ["<|im_end|>"]


def test_a_retrained_model_in_the_same_folder_is_not_served_from_the_cache(tmp_path, tiny_backbone):
    import shutil

    from sdd.evaluation.generation import folder_fingerprint

    folder = tmp_path / "model"
    shutil.copytree(tiny_backbone.resolve(), folder)
    before = folder_fingerprint(str(folder))
    assert before == folder_fingerprint(str(folder)) and folder_fingerprint("owner/hub-id") is None
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b"\0")  # a new save: other size and time
    assert folder_fingerprint(str(folder)) != before


# ---------------------------------------------------------------------------------------- config and evaluate()


def eval_config(tmp_path, cache_dir, tiny_backbone, *overrides):
    return compose_config(
        "eval",
        [
            f"model={tiny_backbone.resolve()}",
            "eval.harmfulness.max_prompts_per_set=3",
            "eval.harmfulness.max_new_tokens=6",
            *overrides,
        ],
        output_dir=tmp_path / "eval",
        cache_dir=cache_dir,
    )


def test_generation_config_resolves_to_the_local_backend_and_a_served_model(tmp_path, cache_dir, tiny_backbone):
    cfg = eval_config(tmp_path, cache_dir, tiny_backbone)
    generation = cfg.eval.generation
    assert generation.backend == "local"
    openai = generation.openai
    assert openai.model == str(tiny_backbone.resolve())  # `vllm serve <folder>` serves it under that name
    assert (openai.base_url, openai.api, openai.vllm_fields) == ("http://127.0.0.1:8000/v1", "completions", True)
    assert (openai.api_key_env, openai.allow_missing_key) == ("VLLM_API_KEY", True)
    assert openai.cache_path == f"{cache_dir}/openai_generations.sqlite"
    assert (openai.max_concurrency, openai.max_retries, openai.timeout_seconds) == (32, 5, 600)
    assert needs_local_model(cfg.eval)
    remote = eval_config(tmp_path, cache_dir, tiny_backbone, "eval.generation.backend=openai")
    assert needs_local_model(remote.eval)  # the benign reference NLL needs the weights
    assert not needs_local_model(
        eval_config(
            tmp_path,
            cache_dir,
            tiny_backbone,
            "eval.generation.backend=openai",
            "eval.benign.reference_nll.enabled=false",
        ).eval
    )


def test_an_unknown_backend_is_one_config_error(tmp_path, cache_dir, tiny_backbone):
    from sdd.evaluation.run import evaluate

    cfg = eval_config(tmp_path, cache_dir, tiny_backbone, "eval.generation.backend=vllm")
    with pytest.raises(ConfigError, match="eval.generation.backend must be one of local, openai, got 'vllm'"):
        evaluate(cfg)


def test_evaluate_with_the_openai_backend_writes_harmful_and_benign_metrics(
    tmp_path, cache_dir, tiny_backbone, endpoint
):  # noqa: F811
    import math

    from sdd.evaluation.run import evaluate

    endpoint.respond = lambda text: Reply(content="I cannot help with that.")
    cfg = eval_config(
        tmp_path,
        cache_dir,
        tiny_backbone,
        "eval.generation.backend=openai",
        f"eval.generation.openai.base_url={endpoint.url}",
        "eval.generation.openai.max_retries=1",
        f"eval.generation.openai.cache_path={tmp_path / 'generations.sqlite'}",
    )
    results = evaluate(cfg)
    output_dir = Path(cfg.paths.output_dir)
    harmful = [json.loads(line) for line in (output_dir / "generations.jsonl").read_text().splitlines()]
    benign = [json.loads(line) for line in (output_dir / "benign_generations.jsonl").read_text().splitlines()]
    assert len(harmful) == 3 and len(benign) == 3
    assert {r["answer"] for r in harmful + benign} == {"I cannot help with that."}
    assert endpoint.count == 6 and {r["path"] for r in endpoint.requests} == {"/v1/completions"}
    sent = {r["body"]["prompt"] for r in endpoint.requests}
    assert all(any(r["prompt"] in text for text in sent) for r in harmful + benign)  # both sets went to the server
    assert {r["body"]["model"] for r in endpoint.requests} == {str(tiny_backbone.resolve())}
    assert {r["body"]["max_tokens"] for r in endpoint.requests} == {6}

    assert results["harmfulness"]["overall"]["refusal_rate"] == 100.0
    assert results["benign"]["overall"]["refusal_rate"] == 100.0 and "on_topic_rate" in results["benign"]["overall"]
    assert math.isfinite(results["benign"]["overall"]["reference_nll"])  # the weights still scored the references
    generation = results["generation"]
    assert (generation["backend"], generation["api"], generation["endpoint"]) == (
        "openai",
        "completions",
        endpoint.url + "/completions",
    )
    assert f"at {endpoint.url}/completions (eval.generation.backend=openai)" in (output_dir / "summary.md").read_text()
    saved = json.loads((output_dir / "results.json").read_text())
    assert saved["generation"] == generation and saved["config"]["eval"]["generation"]["backend"] == "openai"

    evaluate(cfg)  # a re-run: every answer from the cache
    assert endpoint.count == 6


def test_evaluate_with_the_openai_backend_and_no_likelihoods_loads_no_weights(
    tmp_path, cache_dir, tiny_backbone, endpoint, monkeypatch
):  # noqa: F811
    from sdd.backbones import Backbone
    from sdd.evaluation.run import evaluate

    def no_weights(self):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(Backbone, "load_model", no_weights)
    endpoint.respond = lambda text: Reply(content="Sure, here is an overview.")
    cfg = eval_config(
        tmp_path,
        cache_dir,
        tiny_backbone,
        "eval.generation.backend=openai",
        f"eval.generation.openai.base_url={endpoint.url}",
        "eval.benign.reference_nll.enabled=false",
        f"eval.generation.openai.cache_path={tmp_path / 'generations.sqlite'}",
    )
    results = evaluate(cfg)
    assert results["harmfulness"]["overall"]["refusal_rate"] == 0.0
    assert "reference_nll" not in results["benign"]["overall"]
    assert results["benign"]["metrics_by"]["reference_nll"] == "not computed: eval.benign.reference_nll.enabled=false"


def test_a_pipeline_evaluation_stage_is_named_by_what_changes_its_answers(tmp_path, monkeypatch):
    from omegaconf import open_dict

    from sdd.pipeline import StagePlanner, hydra_context

    monkeypatch.setattr("sdd.pipeline.resolve_backbone", lambda backbone: f"/models/{backbone.name}")

    def evaluation(*overrides: str):
        evaluate = ",".join(f'"{o}"' for o in overrides)
        cfg = compose_config(
            "pipeline",
            [
                "experiment=tiny_matrix",
                "point.defense=none",
                "point.attack=none",
                f"stages.overrides.evaluate=[{evaluate}]",
            ],
            log_dir=tmp_path,
            cache_dir=tmp_path / "cache",
            output_dir=tmp_path / "run",
        )
        with hydra_context():
            planner = StagePlanner(cfg, tmp_path / "stages")
            return planner, planner.plan()["evaluate_before_attack"]

    planner, local = evaluation()
    without_block = local.cfg.copy()
    with open_dict(without_block):
        del without_block.eval.generation
        del without_block.stage_overrides  # written into the stage's config after its hash
    assert planner.config_key(without_block) == local.key  # the block left the local backend's hash as it was
    assert evaluation("eval.generation.openai.max_concurrency=3")[1].key == local.key  # unused by local
    remote = evaluation("eval.generation.backend=openai")[1]
    assert remote.key != local.key
    assert (
        evaluation(
            "eval.generation.backend=openai",
            "eval.generation.openai.max_retries=9",
            "eval.generation.openai.timeout_seconds=5",
        )[1].key
        == remote.key
    )  # transport only
    assert evaluation("eval.generation.backend=openai", "eval.generation.openai.api=chat")[1].key != remote.key
