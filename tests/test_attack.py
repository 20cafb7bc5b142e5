"""attack.py's path: full and LoRA fine-tuning attacks on a model folder save folders that load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose_config
from transformers import AutoModelForCausalLM

from sdd.training import train


@pytest.fixture
def harmful_qa_file(tmp_path):
    path = tmp_path / "harmful_qa.csv"
    rows = ["prompt,response"] + [
        f'"Question number {i} about a bad plan","Sure, here is step {i}: do it"' for i in range(30)
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


def attack_config(tmp_path, cache_dir, model_dir, data_file, attack, *overrides):
    return compose_config(
        "attack",
        [
            f"model={model_dir}",
            f"attack={attack}",
            f"corpus.harmful_qa.path={data_file}",
            "corpus.harmful_qa.columns={instruction: prompt, answer: response}",
            "data.source=${corpus.harmful_qa}",
            "data.num_examples=10",
            "data.batch_size=5",
            "data.max_length=64",
            "trainer.max_steps=4",
            "optimizer.lr=1e-2",
            "sample_prompts=null",
            *overrides,
        ],
        output_dir=tmp_path / attack,
        cache_dir=cache_dir,
    )


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("attack", ["mft_beavertails", "mft_beavertails_lora"])
def test_attack_saves_a_loadable_changed_model(attack, tmp_path, cache_dir, tiny_backbone, harmful_qa_file):
    model_dir = tiny_backbone.resolve()
    before = weights(AutoModelForCausalLM.from_pretrained(model_dir))
    cfg = attack_config(tmp_path, cache_dir, model_dir, harmful_qa_file, attack)
    if attack.endswith("lora"):
        assert cfg.module.lora.r == 8
    summary = train(cfg)

    attacked = AutoModelForCausalLM.from_pretrained(summary["model_dir"])
    after = weights(attacked)
    assert set(after) == set(before)  # a plain model folder: LoRA adapters merged, no peft keys
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "the attack did not change the weights"
    if attack.endswith("lora"):  # LoRA touches linear layers only; norms and embeddings are frozen
        assert all("proj" in k for k in changed)
        assert not any("norm" in k or "embed" in k for k in changed)
    assert summary["data"]["train_examples"] == 10
    assert Path(summary["model_dir"], "tokenizer_config.json").exists()
