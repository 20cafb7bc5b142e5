"""evaluate.py's path on the tiny backbone: generations, offline judges, results.json and summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import compose_config

from sdd.evaluation.run import evaluate


def test_evaluate_writes_results_generations_and_summary(tmp_path, cache_dir, tiny_backbone):
    cfg = compose_config(
        "eval",
        [
            f"model={tiny_backbone.resolve()}",
            "eval.harmfulness.max_prompts_per_set=6",
            "eval.harmfulness.max_new_tokens=8",
            "eval.harmfulness.batch_size=4",
        ],
        output_dir=tmp_path / "eval",
        cache_dir=cache_dir,
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
        output_dir=tmp_path / "eval",
        cache_dir=cache_dir,
    )
    with pytest.raises(Exception, match="OPENAI_API_KEY"):
        evaluate(cfg)
    assert not (Path(cfg.paths.output_dir) / "generations.jsonl").exists()


from test_rubric_judge import endpoint  # noqa: E402,F401  (the local chat-completions server fixture)


def test_evaluate_with_the_rubric_judge_on_a_local_endpoint(tmp_path, cache_dir, tiny_backbone, endpoint):  # noqa: F811
    cfg = compose_config(
        "eval",
        [
            f"model={tiny_backbone.resolve()}",
            "eval.harmfulness.max_prompts_per_set=3",
            "eval.harmfulness.max_new_tokens=4",
            "eval.judges.rubric.enabled=true",
            f"eval.judges.rubric.base_url={endpoint.url}",
            "eval.judges.rubric.allow_missing_key=true",
            "eval.judges.relevance.enabled=false",
        ],
        output_dir=tmp_path / "eval",
        cache_dir=tmp_path / "cache",
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
    rows = [
        {
            "subject": "astronomy",
            "question": f"Which planet is number {i}?",
            "choices": ["Mercury", "Venus", "Earth", "Mars"],
            "answer": i % 4,
        }
        for i in range(4)
    ]
    mmlu.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose_config(
        "eval",
        [
            f"model={tiny_backbone.resolve()}",
            "eval.harmfulness.enabled=false",
            "eval.capability.enabled=true",
            f"eval.capability.tasks.mmlu={mmlu}",
        ],
        output_dir=tmp_path / "eval",
        cache_dir=cache_dir,
    )
    results = evaluate(cfg)
    assert results["capability"]["mmlu"]["num_samples"] == 4
    assert 0.0 <= results["capability"]["mmlu"]["acc"] <= 1.0
    assert "| mmlu |" in (Path(cfg.paths.output_dir) / "summary.md").read_text()


def test_capability_enabled_without_any_task_fails_before_the_model_loads(tmp_path, cache_dir, monkeypatch):
    from sdd.errors import ConfigError

    cfg = compose_config(
        "eval",
        ["model=does/not/matter", "corpus=local", "paths.data_dir=/nowhere", "eval.capability.enabled=true"],
        output_dir=tmp_path / "eval",
        cache_dir=cache_dir,
    )
    monkeypatch.setattr("sdd.backbones.Backbone.load_model", lambda self: pytest.fail("the model loaded"))
    with pytest.raises(ConfigError, match="eval.capability.enabled=false"):
        evaluate(cfg)


def test_evaluate_answers_held_out_benign_prompts_and_reports_proxies_and_reference_nll(
    tmp_path, cache_dir, tiny_backbone
):
    import math

    from sdd.data.splits import part_of

    cfg = compose_config(
        "eval",
        [
            f"model={tiny_backbone.resolve()}",
            "eval.harmfulness.max_prompts_per_set=5",
            "eval.harmfulness.max_new_tokens=8",
        ],
        output_dir=tmp_path / "eval",
        cache_dir=cache_dir,
    )
    # Resolved leaf values: the benign block follows the harmful one's sizes and reads the held-out part.
    assert cfg.eval.benign.enabled is True and cfg.eval.benign.max_prompts_per_set == 5
    assert cfg.eval.benign.max_new_tokens == 8 and cfg.eval.benign.reference_nll.max_length == 1024
    assert dict(cfg.eval.benign.prompt_sets.demo_benign.partition) == {
        "part": "heldout",
        "key": "prompt",
        "heldout_fraction": 0.3,
        "seed": 0,
    }
    results = evaluate(cfg)
    output_dir = Path(cfg.paths.output_dir)

    rows = [json.loads(line) for line in (output_dir / "benign_generations.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and {r["kind"] for r in rows} == {"benign"}
    assert all(part_of(r["instruction"], 0.3, 0) == "heldout" for r in rows)  # never a training prompt
    assert all(set(r["verdicts"]) == {"refusal", "relevance"} and r["reference"] for r in rows)
    benign = results["benign"]
    overall = benign["overall"]
    assert overall["num_prompts"] == 5 and benign["per_prompt_set"]["demo_benign"] == overall
    assert overall["on_topic_rate"] == pytest.approx(
        100 * sum(not r["verdicts"]["relevance"]["irrelevant"] for r in rows) / 5
    )
    assert overall["refusal_rate"] == pytest.approx(100 * sum(r["verdicts"]["refusal"]["refusal"] for r in rows) / 5)
    tokens = sum(r["reference_tokens"] for r in rows)
    assert overall["num_reference_tokens"] == tokens and overall["num_references"] == 5
    assert math.isfinite(overall["reference_nll"]) and overall["reference_nll"] > 0
    assert overall["reference_nll"] == pytest.approx(
        sum(r["reference_nll"] * r["reference_tokens"] for r in rows) / tokens
    )
    assert benign["metrics_by"]["on_topic_rate"].startswith("proxy: relevance judge")
    assert benign["metrics_by"]["refusal_rate"].startswith("proxy: refusal judge")
    assert benign["metrics_by"]["reference_nll"].startswith("model:")
    assert results["harmfulness"]["overall"]["num_prompts"] == 5  # the harmful side still runs
    saved = json.loads((output_dir / "results.json").read_text())
    assert saved["benign"]["overall"]["reference_nll"] == overall["reference_nll"]
    assert "over-refusal % (proxy)" in (output_dir / "summary.md").read_text()


def test_a_disabled_judge_leaves_its_benign_metric_out_and_says_so(tmp_path, cache_dir, tiny_backbone):
    cfg = compose_config(
        "eval",
        [
            f"model={tiny_backbone.resolve()}",
            "eval.harmfulness.enabled=false",
            "eval.judges.relevance.enabled=false",
            "eval.benign.max_prompts_per_set=3",
            "eval.benign.max_new_tokens=4",
        ],
        output_dir=tmp_path / "eval",
        cache_dir=cache_dir,
    )
    benign = evaluate(cfg)["benign"]
    assert "on_topic_rate" not in benign["overall"] and "refusal_rate" in benign["overall"]
    assert benign["metrics_by"]["on_topic_rate"] == "not computed: eval.judges.relevance.enabled=false"


def test_reference_nll_is_the_answer_tokens_negative_log_likelihood(tiny_backbone, tiny_tokenizer):
    import torch

    from sdd.chat import instruction_answer, render, tokenize_prompt, user_turn
    from sdd.evaluation.benign import answer_nll

    model = tiny_backbone.load_model().eval()
    pairs = [
        ("Why is the sky blue?", "Rayleigh scattering of sunlight."),
        ("Name a prime number.", "Seven."),
        ("How do plants make food? Explain in a few words.", "Photosynthesis turns light, water and air into sugar."),
    ]
    conversations = [instruction_answer(p, a) for p, a in pairs]
    scored = answer_nll(model, tiny_tokenizer, conversations, batch_size=2, max_length=512)  # padded batches
    for (prompt, _), conversation, (total, count) in zip(pairs, conversations, scored):
        # By hand, one conversation at a time: the prompt as generation sees it, then the rest of the rendering.
        prompt_ids = tokenize_prompt(tiny_tokenizer, user_turn(prompt))
        answer_text = render(tiny_tokenizer, conversation)[len(render(tiny_tokenizer, user_turn(prompt), True)) :]
        answer_ids = tiny_tokenizer(answer_text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + answer_ids])).logits[0]
        logps = torch.log_softmax(logits.double(), -1)
        expected = -sum(logps[len(prompt_ids) - 1 + j, token].item() for j, token in enumerate(answer_ids))
        assert count == len(answer_ids)  # answer tokens only: no prompt token is scored
        assert total == pytest.approx(expected, rel=1e-4)
    assert answer_nll(model, tiny_tokenizer, conversations[:1], max_length=4) == [(0.0, 0)]  # answer cut away


def test_benign_sets_append_the_input_column_and_keep_the_bare_instruction(tmp_path):
    from sdd.evaluation.benign import load_benign_sets

    path = tmp_path / "alpaca.json"
    path.write_text(
        json.dumps(
            [
                {"instruction": "Summarize the text.", "input": "Cats sleep a lot.", "output": "Cats nap."},
                {"instruction": "Name a color.", "input": "", "output": "Blue."},
            ]
        )
    )
    rows = load_benign_sets(
        {"alpaca": {"path": str(path), "columns": {"prompt": "instruction", "input": "input", "reference": "output"}}},
        None,
    )
    assert [r["prompt"] for r in rows] == ["Summarize the text.\n\nCats sleep a lot.", "Name a color."]
    assert [r["instruction"] for r in rows] == ["Summarize the text.", "Name a color."]
    assert [r["reference"] for r in rows] == ["Cats nap.", "Blue."]
