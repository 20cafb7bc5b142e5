"""End to end on the tiny backbone: loss falls, the saved folder loads and generates, a killed run resumes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdd.generation import generate
from sdd.training import train


def logged_losses(output_dir: Path) -> list[tuple[int, float]]:
    rows = []
    for metrics_file in sorted(output_dir.glob("csv/version_*/metrics.csv")):
        with open(metrics_file) as handle:
            rows += [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(handle) if r.get("train/loss")]
    return rows


def test_tiny_sdd_training_end_to_end(tiny_train_config):
    # 40 steps: on the demo's train parts (sdd/data/splits.py) the loss is 0.84 of its start at 30, 0.77 at 40.
    cfg = tiny_train_config("trainer.max_steps=40")
    summary = train(cfg)
    output_dir = Path(cfg.paths.output_dir)

    losses = [loss for _, loss in logged_losses(output_dir)]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5  # the loss falls

    model_dir = Path(summary["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template  # saved with the template the data was formatted with
    answers = generate(model, tokenizer, ["How do I make bread?"], max_new_tokens=6)
    assert len(answers) == 1 and isinstance(answers[0], str)

    manifest = json.loads((output_dir / "data_manifest.json").read_text())
    assert manifest["num_pairs"] == cfg.data.num_examples
    assert len(manifest["rows_per_category"]) == 14
    assert (output_dir / "config.yaml").exists()
    assert not (output_dir / "checkpoints").exists()  # removed once the model folder is saved
    assert [s["prompt"] for s in summary["samples"]] == list(cfg.sample_prompts)


def test_saved_model_matches_trained_weights(tiny_train_config):
    cfg = tiny_train_config("trainer.max_steps=3", "sample_prompts=null")
    summary = train(cfg)
    reloaded = AutoModelForCausalLM.from_pretrained(summary["model_dir"])
    batch = torch.tensor([[1, 5, 9, 12]])
    cfg_backbone = instantiate(cfg.backbone)
    untrained = cfg_backbone.load_model()
    with torch.no_grad():
        trained_logits = reloaded(batch).logits
        assert not torch.allclose(trained_logits, untrained(batch).logits)


class Crash(L.Callback):
    """Kills the run after a given optimizer step, as a pre-empted job would be."""

    def __init__(self, after_step: int) -> None:
        self.after_step = after_step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.after_step:
            raise RuntimeError("simulated crash")


class RecordStart(L.Callback):
    def on_train_start(self, trainer, module) -> None:
        self.first_step = trainer.global_step


def test_killed_run_resumes_from_last_checkpoint(tiny_train_config, monkeypatch):
    cfg = tiny_train_config("trainer.max_steps=10", "checkpoint.every_n_steps=4", "sample_prompts=null")
    original_instantiate = instantiate

    def instantiate_with(callback):
        def patched(config, *args, **kwargs):
            if config.get("_target_") == "lightning.pytorch.Trainer":
                kwargs["callbacks"] = [*kwargs.get("callbacks", []), callback]
            return original_instantiate(config, *args, **kwargs)

        return patched

    monkeypatch.setattr("sdd.training.instantiate", instantiate_with(Crash(after_step=6)))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg)
    output_dir = Path(cfg.paths.output_dir)
    assert (output_dir / "checkpoints" / "last.ckpt").exists()
    assert not (output_dir / "model").exists()

    recorder = RecordStart()
    monkeypatch.setattr("sdd.training.instantiate", instantiate_with(recorder))
    summary = train(cfg)  # same output dir: picks up checkpoints/last.ckpt
    assert recorder.first_step == 4  # resumed from the step-4 checkpoint, not from scratch
    assert summary["global_step"] == 10
    assert Path(summary["model_dir"], "config.json").exists()


def test_prepare_only_builds_the_data_set_and_stops(tiny_train_config):
    cfg = tiny_train_config("prepare_only=true")
    summary = train(cfg)
    output_dir = Path(cfg.paths.output_dir)
    assert summary["model_dir"] is None and not (output_dir / "model").exists()
    assert summary["data"]["train_examples"] == cfg.data.num_examples
    manifest = json.loads((output_dir / "data_manifest.json").read_text())
    assert sum(manifest["rows_per_category"].values()) == cfg.data.num_examples
