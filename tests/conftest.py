"""Shared fixtures: offline environment, composed configs, the tiny backbone."""

from __future__ import annotations

import os

# Before anything imports transformers / datasets: never reach the Hub, never start wandb.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"


def compose_config(name: str, overrides: list[str] = (), **paths: Path) -> DictConfig:
    """Compose a real config of conf/ with test paths."""
    path_overrides = [f"paths.{key}={value}" for key, value in paths.items()]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=[*path_overrides, *overrides])


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_backbone(cache_dir):
    from sdd.backbones import Backbone

    return Backbone(name="tiny_llama", source="tiny", cache_dir=cache_dir / "backbones")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_backbone):
    return tiny_backbone.load_tokenizer()


@pytest.fixture(scope="module")
def tiny_model(tiny_backbone):
    """The tiny Llama with larger random weights, so that greedy answers differ from prompt to prompt."""
    import torch

    model = tiny_backbone.load_model().eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 2 / parameter.shape[1] ** 0.5)
    return model


def offline_env(cache_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of an entry point run as a subprocess: offline, no wandb, its own cache."""
    return dict(
        os.environ,
        SDD_CACHE_DIR=str(cache_dir),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="disabled",
        **extra,
    )


@pytest.fixture
def tiny_train_config(tmp_path, cache_dir):
    """A tiny end-to-end training config: tiny backbone, demo corpus, a few steps."""

    def make(*overrides: str) -> DictConfig:
        return compose_config(
            "train",
            [
                "experiment=quick_tiny",
                "trainer.max_steps=12",
                "data.num_examples=48",
                "checkpoint.every_n_steps=4",
                "sample_max_new_tokens=8",
                *overrides,
            ],
            output_dir=tmp_path / "run",
            cache_dir=cache_dir,
        )

    return make
