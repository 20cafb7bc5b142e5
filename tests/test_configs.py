"""Every config file composes, and its nodes instantiate."""

from __future__ import annotations

import pytest
from conftest import CONF_DIR, compose_config
from hydra.utils import instantiate
from omegaconf import OmegaConf

GROUPS = ["backbone", "corpus", "data", "defense", "optimizer", "scheduler", "trainer", "logger", "scale"]
# Experiments of train.py (those of pipeline.py are tested in test_pipeline.py).
TRAINING_EXPERIMENTS = ["quick_tiny", "sdd_paper"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "override", [f"{g}={o}" for g in GROUPS for o in options(g)] + [f"experiment={e}" for e in TRAINING_EXPERIMENTS]
)
def test_every_option_composes_and_resolves(override, tmp_path):
    extra = ["backbone.name_or_path=some/model"] if override == "backbone=custom" else []
    cfg = compose_config("train", [override, *extra], output_dir=tmp_path, cache_dir=tmp_path / "cache")
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert cfg.data._target_ and cfg.module._target_ and cfg.backbone._target_


def test_every_config_file_opens_with_a_comment():
    for path in CONF_DIR.rglob("*.yaml"):
        first = path.read_text().lstrip().splitlines()[0]
        assert first.startswith("#"), f"{path.relative_to(CONF_DIR)} should open with a comment"


@pytest.mark.parametrize("defense", options("defense"))
def test_defense_nodes_instantiate(defense, tmp_path):
    cfg = compose_config("train", [f"defense={defense}"], output_dir=tmp_path, cache_dir=tmp_path / "cache")
    backbone = instantiate(cfg.backbone)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module, backbone=backbone)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert datamodule.batch_size == cfg.data.batch_size
    assert module.model is None  # the model is loaded lazily, in configure_model
    assert trainer.max_steps == cfg.trainer.max_steps


def test_sdd_reject_differs_from_sdd_only_by_the_prefix(tmp_path):
    sdd = compose_config("train", ["defense=sdd"], output_dir=tmp_path)
    reject = compose_config("train", ["defense=sdd_reject"], output_dir=tmp_path)
    assert reject.data.answer_prefix.startswith("I refuse to answer your question for responsible and ethical reasons.")
    assert reject.data.answer_prefix.endswith("\n\n")
    reject.data.answer_prefix = None
    assert OmegaConf.to_container(reject.data) == OmegaConf.to_container(sdd.data)


def test_paper_experiment_sets_the_paper_hyperparameters(tmp_path):
    cfg = compose_config("train", ["experiment=sdd_paper"], output_dir=tmp_path)
    assert cfg.optimizer.lr == 5e-7 and cfg.trainer.max_steps == 500
    assert cfg.data.batch_size == 24 and cfg.data.max_length == 512 and cfg.data.builder.num_pairs == 8000
    assert cfg.data.builder.threshold == 0.25 and cfg.scheduler.name == "constant_with_warmup"
    assert cfg.corpus.harmful.hub_id == "PKU-Alignment/BeaverTails"
