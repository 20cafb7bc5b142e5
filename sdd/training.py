"""Fine-tuning runs: compose -> build data -> fit -> save a transformers folder.

Defense training (``train.py``) and fine-tuning attacks (``attack.py``) are the same procedure on
different data and models; ``train(cfg)`` serves both and is what the tests call in-process.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sdd.generation import generate

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.ckpt"


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune as ``cfg`` says (a defense, or an attack) and save the model; the logger is closed
    however it ends."""
    try:
        return _train(cfg)
    finally:
        finish_loggers()


def finish_loggers() -> None:
    """Close the wandb run, if any, so the jobs of a multirun never share one."""
    import sys

    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()


def _train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the model of ``cfg`` on its data and save it as a transformers folder.

    A run killed midway resumes from ``<output_dir>/checkpoints/last.ckpt`` when started again with
    the same output directory (``hydra.run.dir=<that run's folder>``), or from ``ckpt_path``.

    Returns:
        ``model_dir`` (the saved transformers folder), the final ``train/loss`` and data statistics.
    """
    check_strategy(cfg)
    log.info(describe_training_size(cfg))
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
    L.seed_everything(cfg.seed, workers=True)

    backbone = instantiate(cfg.backbone)
    tokenizer = backbone.load_tokenizer()
    datamodule = instantiate(cfg.data)
    datamodule.connect(tokenizer)
    if cfg.get("prepare_only"):  # build (and cache) the data set, e.g. on a CPU node before a GPU job
        datamodule.prepare_data()
        datamodule.setup("fit")
        return _write_summary(output_dir, {"model_dir": None, "global_step": 0, "metrics": {}}, datamodule)
    module = instantiate(cfg.module, backbone=backbone)

    checkpoint_dir = output_dir / "checkpoints"
    callbacks = [
        L.pytorch.callbacks.ModelCheckpoint(
            dirpath=checkpoint_dir,
            save_last=True,
            save_top_k=0,
            every_n_train_steps=cfg.checkpoint.every_n_steps,
        )
    ]
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)

    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None and (checkpoint_dir / LAST_CHECKPOINT).exists():
        ckpt_path = str(checkpoint_dir / LAST_CHECKPOINT)
        log.info("Resuming from %s", ckpt_path)
    else:
        log.info("If this run is interrupted, resume it with: hydra.run.dir=%s", output_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    model_dir = output_dir / "model"
    saved_model = save_trained_model(trainer, module, tokenizer, model_dir)
    if not trainer.is_global_zero:
        return {"model_dir": str(model_dir), "global_step": trainer.global_step}
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    summary = _write_summary(
        output_dir, {"model_dir": str(model_dir), "global_step": trainer.global_step, "metrics": metrics}, datamodule
    )
    if not cfg.checkpoint.keep_after_fit:  # the saved folder is the product; optimizer state is large
        shutil.rmtree(checkpoint_dir, ignore_errors=True)

    if cfg.get("sample_prompts") and saved_model is not None:
        answers = generate(saved_model, tokenizer, list(cfg.sample_prompts), cfg.sample_max_new_tokens)
        summary["samples"] = [{"prompt": p, "answer": a} for p, a in zip(cfg.sample_prompts, answers)]
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def check_strategy(cfg: DictConfig) -> None:
    """Refuse, with the fix, a DeepSpeed trainer that cannot run here, before anything is loaded."""
    strategy = cfg.trainer.get("strategy")
    if not isinstance(strategy, DictConfig) or "DeepSpeed" not in str(strategy.get("_target_", "")):
        return
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(
            "DeepSpeed needs CUDA GPUs and none is visible on this machine. Use trainer=cpu here, or run "
            "this config on a GPU node (e.g. through hydra/launcher=slurm)."
        )
    if strategy.get("offload_optimizer") and "DeepSpeedCPUAdam" not in str(cfg.optimizer.get("_target_")):
        raise ValueError("ZeRO optimizer offload needs DeepSpeed's CPU Adam: add optimizer=deepspeed_cpu_adam.")
    from hydra.utils import get_class

    module_class = get_class(cfg.module._target_)
    if not getattr(module_class, "supports_deepspeed", True):
        raise ValueError(
            f"{module_class.__name__} reads and edits whole gradients and weights between the passes of a step, "
            "which DeepSpeed ZeRO partitions across ranks. Use trainer=gpu (bf16, one GPU; add "
            "module.gradient_checkpointing=true for memory) for this defense."
        )
    if strategy.get("stage") == 3 and cfg.module.get("lora"):
        raise ValueError("LoRA under ZeRO-3 is not supported: use trainer=deepspeed_zero2 for LoRA attacks.")


def save_trained_model(trainer: L.Trainer, module, tokenizer, model_dir: Path):
    """Save the trained model from rank 0, consolidating ZeRO-3 shards first.

    Returns:
        The saved model on rank 0, else None.
    """
    state_dict = None
    if getattr(trainer.strategy, "zero_stage_3", False):
        # Collective: every rank sends its shards, rank 0 gets the full 16-bit state dict on CPU.
        consolidated = trainer.strategy.deepspeed_engine._zero3_consolidated_16bit_state_dict()
        if trainer.is_global_zero:
            state_dict = _strip_wrapper_prefix(consolidated, module.model.state_dict().keys())
    saved = save_model(module.model, tokenizer, model_dir, state_dict) if trainer.is_global_zero else None
    trainer.strategy.barrier("save_trained_model")
    return saved


def _strip_wrapper_prefix(state_dict: dict[str, Any], model_keys) -> dict[str, Any]:
    """Map ``_forward_module.model.<key>`` (the engine's names) back to the transformers model's keys."""
    wanted = set(model_keys)
    renamed = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        match = next((".".join(parts[i:]) for i in range(len(parts)) if ".".join(parts[i:]) in wanted), None)
        if match is not None:
            renamed[match] = value
    missing = wanted - set(renamed)
    if missing:
        raise RuntimeError(f"Consolidated ZeRO-3 state dict lacks {len(missing)} weights, e.g. {sorted(missing)[:3]}")
    return renamed


def _write_summary(output_dir: Path, summary: dict[str, Any], datamodule) -> dict[str, Any]:
    """``train_summary.json`` (and ``data_manifest.json`` for built data sets) in the run folder."""
    summary["data"] = datamodule.stats
    manifest = getattr(datamodule, "manifest", None)
    if manifest is not None:
        summary["data_manifest"] = manifest
        (output_dir / "data_manifest.json").write_text(json.dumps(manifest, indent=2))
    (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def save_model(model, tokenizer, model_dir: Path, state_dict: dict[str, Any] | None = None):
    """Save model and tokenizer as a plain transformers folder (loads with ``from_pretrained``).

    LoRA adapters are merged into the weights first, so the folder is a complete model.
    ``state_dict`` replaces the model's own (the consolidated weights of a sharded run).

    Returns:
        The saved (merged) model, or None when weights came from ``state_dict``.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir, state_dict=state_dict)
    tokenizer.save_pretrained(model_dir)
    return None if state_dict is not None else model  # a sharded model cannot generate on one rank


def print_summary(summary: dict[str, Any]) -> None:
    """What a person wants to see at the end of a run."""
    if summary["model_dir"] is None:
        print(f"\nData prepared: {json.dumps(summary['data'])}")
        return
    print(f"\nModel saved to: {summary['model_dir']}")
    loss = summary["metrics"].get("train/loss")
    if loss is not None:
        print(f"Final train/loss: {loss:.4f} after {summary['global_step']} steps")
    for sample in summary.get("samples", []):
        print(f"\n>>> {sample['prompt']}\n{sample['answer']}")


def describe_training_size(cfg: DictConfig) -> str:
    """One line naming what trains (the defense and its scale, or the attack) with its resolved sizes.

    Raises:
        ValueError: neither ``trainer.max_steps`` nor ``trainer.max_epochs`` bounds the run.
    """
    trainer, data = cfg.trainer, cfg.data
    steps, epochs = trainer.get("max_steps"), trainer.get("max_epochs")
    if steps in (None, -1) and epochs in (None, -1):
        raise ValueError("No training length: set trainer.max_steps=<steps>, or trainer.max_epochs=<epochs> with "
                         "trainer.max_steps=-1.")
    if epochs in (None, -1):
        length = f"{steps} steps"
    else:
        length = f"{epochs} epoch{'s' * (epochs != 1)}" + ("" if steps in (None, -1) else f" (at most {steps} steps)")
    accumulate = trainer.get("accumulate_grad_batches") or 1
    batch = f"batch {data.get('batch_size')}" + (f" x {accumulate} accumulated" if accumulate != 1 else "")
    if cfg.get("defense_name"):
        what = f"defense {cfg.defense_name} at scale {cfg.get('scale_name', 'unnamed')}"
    else:
        what = f"attack {cfg.get('attack_name', 'unnamed')}"
    schedule = cfg.scheduler.get("name", "none") if cfg.get("scheduler") else "none"
    return (f"Training {what}: {data.get('num_examples')} examples, {batch}, {data.get('max_length')} tokens, "
            f"{length}, lr {cfg.optimizer.lr:g}, {schedule} schedule (warmup {cfg.module.get('warmup_ratio', 0)})")
