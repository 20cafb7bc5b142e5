"""The benchmark scripts run end to end on the tiny backbone and write positive figures (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import ROOT


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def restore_torch_threads():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the scripts' --threads must not leak into other tests


@pytest.fixture
def common_args(tmp_path, cache_dir):
    # The tiny backbone and a small demo SDD set, built once per session in the tests' cache.
    return ["--override", f"paths.cache_dir={cache_dir}", "data.num_examples=48"]


def test_train_throughput_compares_the_same_work(tmp_path, common_args):
    output = tmp_path / "train.json"
    load_script("train_throughput").main(
        [
            "--backbone",
            "tiny_llama",
            "--batch-size",
            "2",
            "--max-length",
            "48",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--rounds",
            "2",
            "--output",
            str(output),
            *common_args,
        ]
    )
    results = json.loads(output.read_text())
    for framework in ("ours", "trainer"):
        figures = results["frameworks"][framework]
        assert figures["timed_steps"] == 2 and figures["tokens"] > 0
        assert figures["tokens_per_second"] > 0 and figures["seconds"] > 0
    assert results["ratio_ours_over_trainer"] > 0
    assert results["same_batches"]
    # Same model, batches and optimizer: the per-step losses of the two frameworks agree.
    assert len(results["frameworks"]["ours"]["losses_first_round"]) == 2
    assert results["max_abs_loss_difference_first_round"] < 1e-3


def test_generation_throughput_counts_tokens_and_compares_answers(tmp_path, common_args):
    output = tmp_path / "generation.json"
    load_script("generation_throughput").main(
        [
            "--backbone",
            "tiny_llama",
            "--num-prompts",
            "6",
            "--max-new-tokens",
            "4",
            "--batch-size",
            "4",
            "--rounds",
            "2",
            "--output",
            str(output),
            *common_args[:2],
        ]
    )
    results = json.loads(output.read_text())
    assert results["settings"]["prompts"] == 6
    # Interleaved rounds: the one-by-one arm answers every prompt once over the run, the batched arm once a round.
    assert [r["one_by_one"]["prompts"] for r in results["rounds"]] == [3, 3]
    assert [r["batched"]["prompts"] for r in results["rounds"]] == [6, 6]
    assert [r["first"] for r in results["rounds"]] == ["one_by_one", "batched"]
    assert results["runs"]["batch_1"]["prompts_answered"] == 6 and results["runs"]["batch_4"]["prompts_answered"] == 12
    for run in results["runs"].values():
        assert 0 < run["generated_tokens"] <= run["prompts_answered"] * 4
        assert run["tokens_per_second"] > 0
    assert results["speedup_batched_over_batch_1"] > 0 and len(results["speedup_per_round"]) == 2
    assert results["mismatched_answers"] == len(results["mismatched_indices"]) >= 0


def test_defense_step_cost_reports_every_defense_and_error_rows(tmp_path, common_args, monkeypatch):
    script = load_script("defense_step_cost")
    measure = script.measure

    def failing_simpo(defense, args, output_dir):
        if defense == "simpo":
            raise RuntimeError("simulated failure")
        return measure(defense, args, output_dir)

    monkeypatch.setattr(script, "measure", failing_simpo)
    output = tmp_path / "defenses.json"
    script.main(
        [
            "--defenses",
            "safety_align,deepalign,simpo",
            "--batch-size",
            "4",
            "--max-length",
            "48",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--output",
            str(output),
            *common_args,
        ]
    )
    rows = json.loads(output.read_text())["defenses"]
    assert list(rows) == ["sdd", "safety_align", "deepalign", "simpo"]
    assert rows["simpo"] == {"error": "RuntimeError: simulated failure"}
    for name in ("sdd", "safety_align"):
        assert rows[name]["mean_step_seconds"] > 0 and rows[name]["relative_to_sft"] > 0
        assert rows[name]["sequences_per_step"] == 4  # one stream of batch 4
        assert rows[name]["forward_passes_per_step"] == 1
    assert len(rows["sdd"]["runs_mean_step_seconds"]) == 3  # a reference run before each other defense
    # DeepAlign: a safety and a utility batch per step, and its frozen reference's forward pass is counted.
    assert rows["deepalign"]["sequences_per_step"] == 8
    assert rows["deepalign"]["forward_passes_per_step"] >= 3
    assert rows["deepalign"]["relative_to_sft"] > 0


def test_defense_step_cost_discovers_the_config_folder():
    script = load_script("defense_step_cost")
    defenses = script.discover_defenses()
    assert defenses[0] == "sdd"
    assert sorted(defenses) == sorted(p.stem for p in (ROOT / "conf" / "defense").glob("*.yaml"))
