"""Sweeps and logging: a multirun through the submitit launcher, and one finished wandb run per job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from sdd.training import train

ROOT = Path(__file__).resolve().parents[1]


def test_two_job_multirun_through_submitit_local(tmp_path):
    env = dict(os.environ, SDD_CACHE_DIR=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               WANDB_MODE="disabled")
    command = [sys.executable, "train.py", "-m", "hydra/launcher=local", "experiment=quick_tiny",
               "optimizer.lr=1e-3,3e-3", "trainer.max_steps=3", "data.num_examples=16", "sample_prompts=null",
               f"paths.log_dir={tmp_path / 'logs'}"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    summaries = sorted((tmp_path / "logs").rglob("train_summary.json"))
    assert len(summaries) == 2  # one folder per job: the jobs never overwrite each other
    learning_rates = sorted(yaml.safe_load((s.parent / "config.yaml").read_text())["optimizer"]["lr"] for s in summaries)
    assert learning_rates == [1e-3, 3e-3]
    assert all((s.parent / "model" / "config.json").exists() for s in summaries)


def test_wandb_offline_run_is_finished_at_the_end_of_the_job(tiny_train_config, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_train_config("logger=wandb", "trainer.max_steps=2", "sample_prompts=null")
    train(cfg)
    assert wandb.run is None  # finished: the next job of a multirun starts its own run
    runs = list(Path(cfg.paths.output_dir, "wandb").glob("offline-run-*"))
    assert len(runs) == 1
