"""Adding a defense is one module file plus its conf/module/, conf/data/ and conf/defense/ entries.

The example defense is defined here, its three config entries are written to a temporary config folder
(added to Hydra's search path, as a user's own folder would be), and it trains through the pipeline on
the tiny backbone and the demo corpus, then is evaluated. Nothing in sdd/ or conf/ names it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from omegaconf import open_dict

from sdd.errors import DataStreamError
from sdd.modules.ops import answer_logprobs, masked_mean
from sdd.modules.sft import SFTModule


class UnlikelihoodModule(SFTModule):
    """SFT on benign answers plus ``weight`` times the unlikelihood of harmful answers.

    ``L = CE(benign) + weight · mean_t[-log(1 - p(y_t))]`` over the harmful answer tokens ``y_t``.
    """

    streams = ("benign", "harmful")
    data_config = "unlikelihood"

    def __init__(
        self,
        backbone,
        optimizer,
        scheduler=None,
        weight: float = 1.0,
        benign_stream: str = "benign",
        harmful_stream: str = "harmful",
        **kwargs,
    ) -> None:
        super().__init__(backbone, optimizer, scheduler, **kwargs)

    def losses(self, batch):
        hp = self.hparams
        harmful = batch[hp.harmful_stream]
        logits = self.model(input_ids=harmful["input_ids"], attention_mask=harmful["attention_mask"]).logits
        logps, mask = answer_logprobs(logits, harmful["labels"])
        unlikelihood = masked_mean(-torch.log1p(-logps.exp().clamp(max=1 - 1e-6)), mask)
        benign = self.cross_entropy(batch[hp.benign_stream])
        return {"loss": benign + hp.weight * unlikelihood, "benign_ce": benign, "unlikelihood": unlikelihood}

    def forward(self, batch):
        return self.losses(batch)["loss"]

    def training_step(self, batch, batch_idx):
        losses = self.losses(batch)
        self.log_metrics("train", losses, batch_size=batch[self.hparams.benign_stream]["input_ids"].shape[0])
        return losses["loss"]


MODULE_YAML = f"""\
_target_: {__name__}.UnlikelihoodModule
optimizer: ${{optimizer}}
scheduler: ${{scheduler}}
lora: null
weight: 0.5
"""
DATA_YAML = """\
_target_: sdd.datamodules.MultiStreamDataModule
num_examples: 64
batch_size: 4
max_length: 128
streams:
  benign:
    _target_: sdd.datamodules.InstructionAnswerDataModule
    source: ${corpus.benign}
    num_examples: ${data.num_examples}
    batch_size: ${data.batch_size}
    max_length: ${data.max_length}
    seed: ${seed}
  harmful:
    _target_: sdd.datamodules.InstructionAnswerDataModule
    source: ${corpus.harmful_qa}
    num_examples: ${data.num_examples}
    batch_size: ${data.batch_size}
    max_length: ${data.max_length}
    seed: ${seed}
"""
DEFENSE_YAML = """\
# @package _global_
defaults:
  - override /data: unlikelihood
  - override /module: unlikelihood
defense_name: unlikelihood
"""


@pytest.fixture
def user_conf(tmp_path) -> Path:
    """A config folder holding the example defense's three entries."""
    root = tmp_path / "user_conf"
    for group, text in (("module", MODULE_YAML), ("data", DATA_YAML), ("defense", DEFENSE_YAML)):
        (root / group).mkdir(parents=True)
        (root / group / "unlikelihood.yaml").write_text(text)
    return root


def test_a_defense_defined_outside_the_package_trains_through_the_pipeline(user_conf, tmp_path, cache_dir):
    from sdd.pipeline import run_pipeline

    searchpath = f"hydra.searchpath=[file://{user_conf}]"
    cfg = compose_config(
        "pipeline",
        [
            "experiment=tiny_matrix",
            "point.defense=unlikelihood",
            "point.attack=none",
            'stages.overrides.evaluate=["eval.harmfulness.max_prompts_per_set=2","eval.harmfulness.max_new_tokens=2",'
            '"eval.capability.enabled=false","eval.judges.relevance.enabled=false"]',
        ],
        log_dir=tmp_path / "logs",
        cache_dir=cache_dir,
        output_dir=tmp_path / "run",
    )
    with open_dict(cfg):
        cfg.stages.overrides.per_defense["unlikelihood"] = [searchpath]

    record = run_pipeline(cfg)

    defense = record["stages"]["defense"]
    assert defense["global_step"] == 6  # tiny_matrix's length
    assert Path(defense["model_dir"], "config.json").exists()
    assert record["evaluations"]["before_attack"]["harmfulness"]["overall"]["num_prompts"] == 2
    rows = []
    for path in Path(defense["model_dir"]).parent.glob("csv/version_*/metrics.csv"):
        rows += list(csv.DictReader(path.open()))
    logged = [r for r in rows if r.get("train/unlikelihood")]
    assert logged and all(float(r["train/unlikelihood"]) > 0 for r in logged)
    for row in logged:  # the objective the module logs is the one it optimises
        expected = float(row["train/benign_ce"]) + 0.5 * float(row["train/unlikelihood"])
        assert float(row["train/loss"]) == pytest.approx(expected, rel=1e-4)


def test_the_wrong_data_config_is_refused_naming_the_right_one(user_conf, tmp_path, cache_dir):
    from sdd.training import train

    cfg = compose_config(
        "train",
        [
            f"hydra.searchpath=[file://{user_conf}]",
            "experiment=quick_tiny",
            "defense=unlikelihood",
            "data=booster",
            "trainer.max_steps=2",
            "data.num_examples=8",
        ],
        output_dir=tmp_path / "run",
        cache_dir=cache_dir,
    )
    assert cfg.module.weight == 0.5 and cfg.data.streams.keys() == {"alignment", "harmful"}
    with pytest.raises(
        DataStreamError, match=r"module.benign_stream='benign'.*\['alignment', 'harmful'\].*data=unlikelihood"
    ):
        train(cfg)
