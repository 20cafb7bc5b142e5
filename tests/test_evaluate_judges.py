"""Judges inside evaluate() and pipeline.py: several judges and their agreement, and a judge that fails
(rejected key, invalid replies) failing the evaluation and its stage, with a re-run that resumes."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from conftest import compose_config
from judge_endpoint import FAKE_KEY, KEY_ENV, Reply, endpoint  # noqa: F401

from sdd.evaluation.llm_judge import JudgeAuthenticationError, TooFewValidVerdictsError
from sdd.evaluation.run import evaluate

NUM_PROMPTS = 4


def judge_overrides(url: str, cache: Path, *judges: str) -> list[str]:
    out = []
    for name in judges:
        out += [
            f"eval.judges.{name}.enabled=true",
            f"eval.judges.{name}.base_url={url}",
            f"eval.judges.{name}.api_key_env={KEY_ENV}",
            f"eval.judges.{name}.cache_path={cache}",
            f"eval.judges.{name}.max_concurrency=1",
            f"eval.judges.{name}.max_retries=1",
        ]
    return out


def eval_config(tmp_path, cache_dir, tiny_backbone, *overrides):
    return compose_config(
        "eval",
        [
            f"model={tiny_backbone.resolve()}",
            f"eval.harmfulness.max_prompts_per_set={NUM_PROMPTS}",
            "eval.harmfulness.max_new_tokens=4",
            *overrides,
        ],
        output_dir=tmp_path / "eval",
        cache_dir=cache_dir,
    )


def both_rubrics(user_text: str) -> Reply:
    """The HEx-PHI reply when asked for #thescore, the StrongREJECT one when asked for 3.b."""
    if "#thescore" in user_text:
        return Reply(content="#thereason: no harmful content\n#thescore: 1")
    return Reply(content="#overall_reasoning nothing useful\n#scores\n1.a no help\n1.b 1\n2.a -\n2.b 1\n3.a -\n3.b 1")


def test_evaluate_with_two_llm_judges_and_the_proxy(tmp_path, cache_dir, tiny_backbone, endpoint, monkeypatch):  # noqa: F811
    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    endpoint.respond = both_rubrics
    cfg = eval_config(
        tmp_path,
        cache_dir,
        tiny_backbone,
        *judge_overrides(endpoint.url, tmp_path / "judges.sqlite", "rubric", "strongreject"),
    )
    results = evaluate(cfg)
    harm = results["harmfulness"]
    overall = harm["overall"]
    assert (
        overall["harmfulness_score"] == 1.0
        and overall["harmfulness_rate"] == 0.0
        and overall["num_valid"] == NUM_PROMPTS
    )
    assert overall["strongreject_score"] == 0.0 and overall["strongreject_refusal_rate"] == 100.0
    assert overall["strongreject_num_valid"] == NUM_PROMPTS and "on_topic_compliance" in overall
    assert endpoint.count == 2 * NUM_PROMPTS

    judges = harm["judges"]
    assert {name: d["kind"] for name, d in judges.items()} == {
        "refusal": "proxy",
        "relevance": "proxy",
        "rubric": "llm_judge",
        "strongreject": "llm_judge",
        "proxy": "proxy",
    }
    assert judges["rubric"]["prompt_file"] == "hexphi_rubric.txt" and judges["rubric"]["off_topic_is_harmless"] is False
    assert judges["rubric"]["model"] == "gpt-4o" and len(judges["rubric"]["prompt_sha256"]) == 64
    assert judges["strongreject"]["metrics"] == [
        "strongreject_score",
        "strongreject_refusal_rate",
        "strongreject_num_valid",
        "strongreject_num_invalid",
        "strongreject_num_failed",
    ]
    assert set(harm["agreement"]) == {"rubric|strongreject", "rubric|proxy", "strongreject|proxy"}
    both_harmless = harm["agreement"]["rubric|strongreject"]
    assert both_harmless["num_items"] == NUM_PROMPTS and both_harmless["percent_agreement"] == 100.0
    assert both_harmless["cohen_kappa"] is None  # both judges say "not harmful" for every answer: undefined

    saved = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert saved["harmfulness"]["agreement"] == harm["agreement"] and saved["harmfulness"]["judges"] == judges
    rows = [json.loads(line) for line in (Path(cfg.paths.output_dir) / "generations.jsonl").read_text().splitlines()]
    assert rows[0]["verdicts"]["strongreject"]["refused"] == 1 and rows[0]["verdicts"]["rubric"]["score"] == 1


def rejects_after(count: int, then=both_rubrics):
    """Answer the first ``count`` requests, then reject the key (HTTP 401) until ``fixed`` is set."""
    state = {"n": 0, "fixed": False}
    lock = threading.Lock()

    def respond(user_text: str) -> Reply:
        with lock:
            state["n"] += 1
            ok = state["fixed"] or state["n"] <= count
        return then(user_text) if ok else Reply(status=401, raw='{"error": "invalid api key"}')

    respond.state = state
    return respond


def test_a_rejected_key_fails_the_evaluation_and_a_rerun_resumes(
    tmp_path, cache_dir, tiny_backbone, endpoint, monkeypatch
):  # noqa: F811
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    endpoint.respond = rejects_after(1)
    cfg = eval_config(
        tmp_path, cache_dir, tiny_backbone, *judge_overrides(endpoint.url, tmp_path / "r.sqlite", "rubric")
    )
    with pytest.raises(JudgeAuthenticationError) as caught:
        evaluate(cfg)
    message = str(caught.value)
    assert f"check the key in ${KEY_ENV}" in message and "HTTP 401" in message and "\n" not in message
    assert f"1 of {NUM_PROMPTS} items are judged" in message
    assert endpoint.count == 2  # one answered, one rejected, no retry and no further item
    output_dir = Path(cfg.paths.output_dir)
    assert not (output_dir / "results.json").exists() and (output_dir / "generations.jsonl").exists()

    endpoint.respond.state["fixed"] = True
    results = evaluate(cfg)
    assert results["harmfulness"]["overall"]["num_valid"] == NUM_PROMPTS
    assert endpoint.count == 2 + NUM_PROMPTS - 1  # the answered item came from the cache


def test_invalid_replies_fail_the_evaluation(tmp_path, cache_dir, tiny_backbone, endpoint, monkeypatch):  # noqa: F811
    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    endpoint.respond = lambda text: Reply(content="I would rather not grade this.")
    cfg = eval_config(
        tmp_path, cache_dir, tiny_backbone, *judge_overrides(endpoint.url, tmp_path / "r.sqlite", "rubric")
    )
    with pytest.raises(
        TooFewValidVerdictsError,
        match=rf"Judge 'rubric' \(gpt-4o\) gave a valid verdict on 0 of {NUM_PROMPTS} answers.*"
        r"invalid replies .*rather not grade.*hexphi_rubric.txt",
    ):
        evaluate(cfg)
    assert not (Path(cfg.paths.output_dir) / "results.json").exists()
    # Lowering the bar does not help when nothing is valid.
    cfg.eval.judges.min_valid_fraction = 0.0
    with pytest.raises(TooFewValidVerdictsError):
        evaluate(cfg)


def test_a_rejected_key_fails_the_pipeline_stage_which_reruns_later(tmp_path, cache_dir, endpoint, monkeypatch):  # noqa: F811
    from sdd.pipeline import STAGE_RECORD, run_pipeline

    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    endpoint.respond = rejects_after(2)
    evaluate_overrides = ",".join(
        f'"{o}"'
        for o in [
            f"eval.harmfulness.max_prompts_per_set={NUM_PROMPTS}",
            "eval.harmfulness.max_new_tokens=4",
            "eval.judges.relevance.enabled=false",
            *judge_overrides(endpoint.url, tmp_path / "r.sqlite", "rubric"),
        ]
    )

    def point():
        return compose_config(
            "pipeline",
            [
                "experiment=tiny_matrix",
                "point.defense=none",
                "point.attack=none",
                f"stages.overrides.evaluate=[{evaluate_overrides}]",
            ],
            log_dir=tmp_path / "logs",
            cache_dir=cache_dir,
            output_dir=tmp_path / "run",
        )

    with pytest.raises(JudgeAuthenticationError, match=f"2 of {NUM_PROMPTS} items"):
        run_pipeline(point())
    stages = tmp_path / "logs" / "stages"
    assert stages.is_dir() and not list(stages.rglob(STAGE_RECORD))  # the stage is not recorded as finished
    assert not (tmp_path / "run" / "results.json").exists()

    endpoint.respond.state["fixed"] = True  # the key is fixed
    record = run_pipeline(point())
    assert record["reused_stages"] == [] and len(list(stages.rglob(STAGE_RECORD))) == 1
    assert record["evaluations"]["before_attack"]["harmfulness"]["overall"]["num_valid"] == NUM_PROMPTS
    assert endpoint.count == 3 + NUM_PROMPTS - 2  # the two judged before the failure were not asked again
