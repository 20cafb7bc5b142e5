"""Sweeps and logging: a multirun through the submitit launcher, and one finished wandb run per job."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import offline_env

from sdd.training import train

ROOT = Path(__file__).resolve().parents[1]


def test_two_job_multirun_of_tiny_matrix_points_through_submitit_local(tmp_path):
    # The two jobs run side by side: one thread each, or they fight over the cores and slow down many times.
    env = offline_env(tmp_path / "cache", OMP_NUM_THREADS="1")
    command = [
        sys.executable,
        "pipeline.py",
        "-m",
        "hydra/launcher=local",
        "experiment=tiny_matrix",
        "point.defense=none,sdd",
        "point.attack=mft_advbench",
        f"paths.log_dir={tmp_path / 'logs'}",
        'stages.overrides.evaluate=["eval.harmfulness.max_prompts_per_set=4","eval.harmfulness.max_new_tokens=4"]',
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    results = sorted((tmp_path / "logs" / "tiny_matrix" / "multiruns").rglob("results.json"))
    points = [json.loads(p.read_text()) for p in results if "evaluate" not in p.parts]
    assert sorted(p["point"]["defense"] for p in points) == ["none", "sdd"]  # one folder per job
    for point in points:
        assert point["stages"]["attack"]["global_step"] == 6
        assert Path(point["stages"]["attack"]["model_dir"], "config.json").exists()
        assert (
            point["evaluations"]["after_attack"]["harmfulness"]["overall"]["num_prompts"] == 4
        )  # the demo has one prompt set


def test_wandb_offline_run_is_finished_at_the_end_of_the_job(tiny_train_config, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_train_config("logger=wandb", "trainer.max_steps=2", "sample_prompts=null")
    train(cfg)
    assert wandb.run is None  # finished: the next job of a multirun starts its own run
    runs = list(Path(cfg.paths.output_dir, "wandb").glob("offline-run-*"))
    assert len(runs) == 1


def test_wandb_run_is_finished_when_the_job_fails(tiny_train_config, monkeypatch):
    import pytest
    import wandb

    from sdd.modules import SFTModule

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")

    def fail(self, batch, batch_idx):
        self.logger.experiment  # the run has started
        raise RuntimeError("simulated failure inside training")

    monkeypatch.setattr(SFTModule, "training_step", fail)
    cfg = tiny_train_config("logger=wandb", "trainer.max_steps=2", "sample_prompts=null")
    with pytest.raises(RuntimeError, match="simulated failure"):
        train(cfg)
    assert wandb.run is None  # finished although the job failed: the next job gets its own run
    assert len(list(Path(cfg.paths.output_dir, "wandb").glob("offline-run-*"))) == 1
