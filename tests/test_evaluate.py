"""evaluate.py's path on the tiny backbone: generations, offline judges, results.json and summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdd.evaluation.run import evaluate

from conftest import compose_config


def test_evaluate_writes_results_generations_and_summary(tmp_path, cache_dir, tiny_backbone):
    cfg = compose_config(
        "eval",
        [f"model={tiny_backbone.resolve()}", "eval.harmfulness.max_prompts_per_set=6",
         "eval.harmfulness.max_new_tokens=8", "eval.harmfulness.batch_size=4"],
        output_dir=tmp_path / "eval", cache_dir=cache_dir,
    )
    results = evaluate(cfg)
    output_dir = Path(cfg.paths.output_dir)

    rows = [json.loads(line) for line in (output_dir / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    assert set(rows[0]["verdicts"]) == {"refusal", "relevance"}
    overall = results["harmfulness"]["overall"]
    assert overall["num_prompts"] == 6
    refusals = sum(r["verdicts"]["refusal"]["refusal"] for r in rows)
    assert overall["refusal_rate"] == pytest.approx(100 * refusals / 6)
    relevance = [r["verdicts"]["relevance"]["relevance"] for r in rows]
    assert overall["mean_relevance"] == pytest.approx(sum(relevance) / 6, abs=1e-5)
    per_category = results["harmfulness"]["per_category"]
    assert sum(m["num_prompts"] for m in per_category.values()) == 6

    saved = json.loads((output_dir / "results.json").read_text())
    assert saved["config"]["eval"]["harmfulness"]["max_new_tokens"] == 8  # the config that produced it
    assert "refusal_rate" in (output_dir / "summary.md").read_text()


def test_rubric_judge_without_key_fails_before_generating(tmp_path, cache_dir, tiny_backbone, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = compose_config(
        "eval",
        [f"model={tiny_backbone.resolve()}", "eval.judges.rubric.enabled=true"],
        output_dir=tmp_path / "eval", cache_dir=cache_dir,
    )
    with pytest.raises(Exception, match="OPENAI_API_KEY"):
        evaluate(cfg)
    assert not (Path(cfg.paths.output_dir) / "generations.jsonl").exists()


from test_rubric_judge import endpoint  # noqa: E402,F401  (the local chat-completions server fixture)


def test_evaluate_with_the_rubric_judge_on_a_local_endpoint(tmp_path, cache_dir, tiny_backbone, endpoint):  # noqa: F811
    cfg = compose_config(
        "eval",
        [f"model={tiny_backbone.resolve()}", "eval.harmfulness.max_prompts_per_set=3",
         "eval.harmfulness.max_new_tokens=4", "eval.judges.rubric.enabled=true",
         f"eval.judges.rubric.base_url={endpoint.url}", "eval.judges.rubric.allow_missing_key=true",
         "eval.judges.relevance.enabled=false"],
        output_dir=tmp_path / "eval", cache_dir=tmp_path / "cache",
    )
    results = evaluate(cfg)
    overall = results["harmfulness"]["overall"]
    # The fake judge scores 1 unless the answer says "Sure, here is": the tiny model never does.
    assert overall["harmfulness_score"] == 1.0 and overall["harmfulness_rate"] == 0.0
    assert overall["num_valid"] == 3 and endpoint.count == 3
    evaluate(cfg)  # a rerun is served from the on-disk cache
    assert endpoint.count == 3


def test_evaluate_runs_capability_tasks_from_local_files(tmp_path, cache_dir, tiny_backbone):
    mmlu = tmp_path / "mmlu.jsonl"
    rows = [{"subject": "astronomy", "question": f"Which planet is number {i}?",
             "choices": ["Mercury", "Venus", "Earth", "Mars"], "answer": i % 4} for i in range(4)]
    mmlu.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose_config(
        "eval",
        [f"model={tiny_backbone.resolve()}", "eval.harmfulness.enabled=false", "eval.capability.enabled=true",
         f"eval.capability.tasks.mmlu={mmlu}"],
        output_dir=tmp_path / "eval", cache_dir=cache_dir,
    )
    results = evaluate(cfg)
    assert results["capability"]["mmlu"]["num_samples"] == 4
    assert 0.0 <= results["capability"]["mmlu"]["acc"] <= 1.0
    assert "| mmlu |" in (Path(cfg.paths.output_dir) / "summary.md").read_text()
