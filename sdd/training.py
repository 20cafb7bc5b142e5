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
    """Train the defense of ``cfg`` and save the defended model.

    A run killed midway resumes from ``<output_dir>/checkpoints/last.ckpt`` when started again with
    the same output directory (``hydra.run.dir=<that run's folder>``), or from ``ckpt_path``.

    Returns:
        ``model_dir`` (the saved transformers folder), the final ``train/loss`` and data statistics.
    """
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
    saved_model = save_model(module.model, tokenizer, model_dir)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    summary = _write_summary(
        output_dir, {"model_dir": str(model_dir), "global_step": trainer.global_step, "metrics": metrics}, datamodule
    )
    if not cfg.checkpoint.keep_after_fit:  # the saved folder is the product; optimizer state is large
        shutil.rmtree(checkpoint_dir, ignore_errors=True)

    if cfg.get("sample_prompts"):
        answers = generate(saved_model, tokenizer, list(cfg.sample_prompts), cfg.sample_max_new_tokens)
        summary["samples"] = [{"prompt": p, "answer": a} for p, a in zip(cfg.sample_prompts, answers)]
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _write_summary(output_dir: Path, summary: dict[str, Any], datamodule) -> dict[str, Any]:
    """``train_summary.json`` (and ``data_manifest.json`` for built data sets) in the run folder."""
    summary["data"] = datamodule.stats
    manifest = getattr(datamodule, "manifest", None)
    if manifest is not None:
        summary["data_manifest"] = manifest
        (output_dir / "data_manifest.json").write_text(json.dumps(manifest, indent=2))
    (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def save_model(model, tokenizer, model_dir: Path):
    """Save model and tokenizer as a plain transformers folder (loads with ``from_pretrained``).

    LoRA adapters are merged into the weights first, so the folder is a complete model.

    Returns:
        The saved (merged) model.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model


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
