"""DeepSpeed trainer configs: valid DeepSpeed configs on CPU, and a clear refusal without a GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import CONF_DIR, compose_config
from deepspeed.runtime.config import DeepSpeedConfig
from hydra.utils import instantiate
from lightning.pytorch.strategies import DeepSpeedStrategy

from sdd.training import check_strategy, train

EXPECTED = {"deepspeed_zero2": (2, False), "deepspeed_zero3": (3, False), "deepspeed_zero3_offload": (3, True)}


@pytest.mark.parametrize("trainer", sorted(EXPECTED))
def test_deepspeed_config_is_valid(trainer, tmp_path):
    cfg = compose_config("train", [f"trainer={trainer}"], output_dir=tmp_path)
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, DeepSpeedStrategy)
    config = dict(strategy.config)
    assert isinstance(config["zero_optimization"], dict)  # a plain dict, not a DictConfig
    # Lightning adds the batch keys at fit time; DeepSpeed validates the rest here.
    config.update(train_micro_batch_size_per_gpu=cfg.data.batch_size, gradient_accumulation_steps=1)
    parsed = DeepSpeedConfig(config)
    stage, offload = EXPECTED[trainer]
    assert parsed.zero_optimization_stage == stage
    assert (parsed.zero_config.offload_optimizer is not None) == offload
    assert cfg.trainer.precision == "bf16-mixed"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_deepspeed_without_gpu_fails_with_the_fix(tmp_path, cache_dir):
    cfg = compose_config(
        "train", ["trainer=deepspeed_zero2", "backbone=tiny_llama"], output_dir=tmp_path / "run", cache_dir=cache_dir
    )
    with pytest.raises(RuntimeError, match="trainer=cpu"):
        train(cfg)
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before anything was written


def test_offload_needs_cpu_adam_and_zero3_refuses_lora(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    offload = compose_config("train", ["trainer=deepspeed_zero3_offload"], output_dir=tmp_path)
    with pytest.raises(ValueError, match="optimizer=deepspeed_cpu_adam"):
        check_strategy(offload)
    check_strategy(
        compose_config(
            "train", ["trainer=deepspeed_zero3_offload", "optimizer=deepspeed_cpu_adam"], output_dir=tmp_path
        )
    )
    lora = compose_config("attack", ["trainer=deepspeed_zero3", "attack=mft_advbench_lora"], output_dir=tmp_path)
    with pytest.raises(ValueError, match="deepspeed_zero2"):
        check_strategy(lora)


@pytest.mark.parametrize("defense", sorted(p.stem for p in (CONF_DIR / "defense").glob("*.yaml")))
def test_defenses_that_edit_whole_gradients_refuse_deepspeed(defense, tmp_path, monkeypatch):
    from hydra.utils import get_class

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = compose_config("train", ["trainer=deepspeed_zero2", f"defense={defense}"], output_dir=tmp_path)
    if getattr(get_class(cfg.module._target_), "supports_deepspeed", True):
        check_strategy(cfg)
    else:
        with pytest.raises(ValueError, match="trainer=gpu"):
            check_strategy(cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("trainer", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_training_saves_a_consolidated_model(trainer, tiny_train_config):
    """On a GPU: the saved folder holds the trained weights, gathered from the ZeRO shards."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_train_config(f"trainer={trainer}", "defense=safety_align", "trainer.max_steps=8", "sample_prompts=null")
    initial = AutoModelForCausalLM.from_pretrained(instantiate(cfg.backbone).resolve())
    summary = train(cfg)
    trained = AutoModelForCausalLM.from_pretrained(summary["model_dir"])
    assert summary["global_step"] == 8
    changed = [
        name
        for name, p in trained.state_dict().items()
        if not torch.allclose(p.float(), initial.state_dict()[name].float())
    ]
    assert len(changed) > len(trained.state_dict()) // 2  # trained, and no shard saved empty
    assert all(p.numel() > 0 and p.abs().sum() > 0 for n, p in trained.state_dict().items() if "weight" in n)
