"""Fine-tuning runs: compose -> build data -> fit -> save a transformers folder.

Defense training (``train.py``) and fine-tuning attacks (``attack.py``) are the same procedure on
different data and models; ``train(cfg)`` serves both and is what the tests call in-process.

A run folder is safe to start again:

- a finished run (``model/`` saved) is not overwritten unless ``overwrite=true``;
- an unfinished one resumes from ``checkpoints/last.ckpt``, but only with the config it was trained
  with (the checkpoint carries it): a changed value is refused, naming the keys; ``resume=false``
  starts afresh. Keys that say where or how long a run goes (:data:`RESUME_IGNORED`) may change;
- checkpoints are written to a temporary file and renamed, so a crash or a full disk never leaves a
  partial ``last.ckpt``; one that does not load anyway is set aside as ``<name>.corrupt``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sdd.credentials import scrub_credentials
from sdd.errors import ConfigError, NoGPUError, require_device
from sdd.generation import generate
from sdd.progress import training_progress_bar

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.ckpt"
CONFIG_IN_CHECKPOINT = "sdd_config"  # the run's resolved config (JSON), stored in every checkpoint
# Keys a resumed run may change: where files go, logging, and how long the run goes (max_steps may be
# raised to train a finished-but-kept checkpoint further). Any other difference is refused.
RESUME_IGNORED = (
    "paths",
    "logger",
    "checkpoint",
    "ckpt_path",
    "resume",
    "overwrite",
    "prepare_only",
    "task_name",
    "sample_prompts",
    "sample_max_new_tokens",
    "stage_overrides",
    "data.num_workers",
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.max_time",
    "trainer.min_steps",
    "trainer.min_epochs",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.default_root_dir",
)
# Values Hydra takes as text when mistyped (trainer.max_steps=abc); checked before anything is built.
INTEGER_KEYS = (
    "seed",
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.accumulate_grad_batches",
    "trainer.log_every_n_steps",
    "checkpoint.every_n_steps",
    "data.batch_size",
    "data.max_length",
    "data.num_examples",
)
NUMBER_KEYS = ("optimizer.lr", "trainer.gradient_clip_val")


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
    the same output directory (``hydra.run.dir=<that run's folder>``) and the same config, or from
    ``ckpt_path``. Everything that can be refused (values, GPU, a finished folder, a changed config) is
    checked before anything is written or loaded.

    Returns:
        ``model_dir`` (the saved transformers folder), the final ``train/loss`` and data statistics.
    """
    check_values(cfg)
    check_strategy(cfg)
    log.info(describe_training_size(cfg))
    output_dir = Path(cfg.paths.output_dir)
    refuse_finished_run(output_dir, cfg)
    checkpoint_dir = output_dir / "checkpoints"
    run_config = comparable_config(cfg)
    ckpt_path = None if cfg.get("prepare_only") else choose_checkpoint(cfg, checkpoint_dir, run_config)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, output_dir / "config.yaml")
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

    callbacks = [
        AtomicModelCheckpoint(
            run_config,
            dirpath=checkpoint_dir,
            save_last=True,
            save_top_k=0,
            every_n_train_steps=cfg.checkpoint.every_n_steps,
        ),
        *training_progress_bar(cfg.trainer),  # "Epoch 1 (at most 40 steps)", not Lightning's "Epoch 0/-2"
    ]
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)

    if ckpt_path is None:
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
        remove_checkpoints(checkpoint_dir)

    if cfg.get("sample_prompts") and saved_model is not None:
        answers = generate(saved_model, tokenizer, list(cfg.sample_prompts), cfg.sample_max_new_tokens)
        summary["samples"] = [{"prompt": p, "answer": a} for p, a in zip(cfg.sample_prompts, answers)]
        _write_atomically(output_dir / "train_summary.json", json.dumps(scrub_credentials(summary), indent=2))
    return summary


def check_values(cfg: DictConfig) -> None:
    """Refuse, naming the key, a mistyped number (``trainer.max_steps=abc``) or a GPU trainer without a GPU."""
    for key in (*INTEGER_KEYS, *NUMBER_KEYS):
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        wanted = int if key in INTEGER_KEYS else (int, float)
        if isinstance(value, bool) or not isinstance(value, wanted):
            kind = "an integer" if key in INTEGER_KEYS else "a number"
            raise ConfigError(f"{key} must be {kind}, got {value!r}. Fix: {key}=<{kind.split()[-1]}>.")
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="cpu"))
    if accelerator in ("gpu", "cuda"):
        try:
            require_device("cuda", "trainer.accelerator")
        except NoGPUError:
            raise NoGPUError(
                f"trainer.accelerator={accelerator} (trainer=gpu) needs a CUDA GPU and none is visible on this "
                "machine. Fix: trainer=cpu here, or run on a GPU node (e.g. hydra/launcher=slurm)."
            ) from None


def check_strategy(cfg: DictConfig) -> None:
    """Refuse, with the fix, a DeepSpeed trainer that cannot run here, before anything is loaded."""
    strategy = cfg.trainer.get("strategy")
    if not isinstance(strategy, DictConfig) or "DeepSpeed" not in str(strategy.get("_target_", "")):
        return
    import torch

    if not torch.cuda.is_available():
        raise NoGPUError(
            "DeepSpeed needs CUDA GPUs and none is visible on this machine. Use trainer=cpu here, or run "
            "this config on a GPU node (e.g. through hydra/launcher=slurm)."
        )
    if strategy.get("offload_optimizer") and "DeepSpeedCPUAdam" not in str(cfg.optimizer.get("_target_")):
        raise ConfigError("ZeRO optimizer offload needs DeepSpeed's CPU Adam: add optimizer=deepspeed_cpu_adam.")
    from hydra.utils import get_class

    module_class = get_class(cfg.module._target_)
    if not getattr(module_class, "supports_deepspeed", True):
        raise ConfigError(
            f"{module_class.__name__} reads and edits whole gradients and weights between the passes of a step, "
            "which DeepSpeed ZeRO partitions across ranks. Use trainer=gpu (bf16, one GPU; add "
            "module.gradient_checkpointing=true for memory) for this defense."
        )
    if strategy.get("stage") == 3 and cfg.module.get("lora"):
        raise ConfigError("LoRA under ZeRO-3 is not supported: use trainer=deepspeed_zero2 for LoRA attacks.")


# ---------------------------------------------------------------------------- run folder safety
def refuse_finished_run(output_dir: Path, cfg: DictConfig) -> None:
    """A folder whose ``model/`` is saved holds a finished run: refuse to overwrite it unless asked."""
    model_dir = output_dir / "model"
    if cfg.get("overwrite") or not model_dir.is_dir() or not any(model_dir.iterdir()):
        return
    raise ConfigError(
        f"{output_dir} already holds a finished run (its model/ is saved); refusing to overwrite it. Fix: choose "
        "a new folder (hydra.run.dir=<new folder>, or leave hydra.run.dir unset), or add overwrite=true to train "
        "again into this one (its model is replaced when the new run finishes)."
    )


def write_config(cfg: DictConfig, path: Path) -> None:
    """The resolved config as YAML, without credentials in URLs."""
    import yaml

    container = scrub_credentials(OmegaConf.to_container(cfg, resolve=True))
    _write_atomically(path, yaml.safe_dump(container, sort_keys=False, allow_unicode=True))


def comparable_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as flat ``{dotted key: value}``, credentials scrubbed and this machine's paths
    written as ``<paths.name>``: what a resumed run must share with its checkpoint (before ignored keys)."""
    container = scrub_credentials(OmegaConf.to_container(cfg, resolve=True))
    flat = _flatten(json.loads(json.dumps(container, default=str)))
    paths = sorted(
        (
            (str(v).rstrip("/"), f"<paths.{k}>")
            for k, v in (container.get("paths") or {}).items()
            if isinstance(v, str) and v.strip("./")
        ),
        key=lambda item: -len(item[0]),
    )

    def placeholder(value: Any) -> Any:
        if isinstance(value, str):
            for path, name in paths:  # longest first: a path inside another gets its own name
                if value == path or value.startswith(path + "/"):
                    return name + value[len(path) :]
        return value

    return {key: placeholder(value) for key, value in flat.items()}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def config_differences(trained_with: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every key that differs, keys of :data:`RESUME_IGNORED` aside."""

    def ignored(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in RESUME_IGNORED)

    keys = sorted(k for k in set(trained_with) | set(now) if not ignored(k))
    missing = "<absent>"
    return [
        f"{k}: {trained_with.get(k, missing)!r} -> {now.get(k, missing)!r}"
        for k in keys
        if trained_with.get(k, missing) != now.get(k, missing)
    ]


def choose_checkpoint(cfg: DictConfig, checkpoint_dir: Path, run_config: dict[str, Any]) -> str | None:
    """The checkpoint to resume from: ``ckpt_path``, else the newest loadable one in ``checkpoint_dir``
    (unless ``resume=false``), else None (a fresh start).

    A checkpoint of this folder that does not load is renamed ``<name>.corrupt`` (with a warning) and the
    next one is tried. Resuming with a config other than the checkpoint's is refused, naming the keys.
    """
    explicit = cfg.get("ckpt_path")
    if explicit is not None:
        path = Path(str(explicit)).expanduser()
        stored = _read_checkpoint(path)
        if stored is _UNREADABLE:
            raise ConfigError(
                f"ckpt_path={explicit} does not load (missing, truncated or damaged). Fix: ckpt_path="
                "<another checkpoint>, or ckpt_path=null."
            )
        differences = config_differences(stored, run_config) if isinstance(stored, dict) else []
        if differences:  # the user chose this checkpoint: say what differs, do not refuse
            log.warning("ckpt_path=%s was trained with other settings: %s", explicit, "; ".join(differences))
        return str(path)
    for partial in checkpoint_dir.glob("*.partial"):  # a write that never finished
        _remove_path(partial)
    candidates = sorted(
        (p for p in checkpoint_dir.glob("*.ckpt")), key=lambda p: (p.name != LAST_CHECKPOINT, -p.stat().st_mtime)
    )
    if not candidates:
        return None
    if not cfg.get("resume", True):
        log.warning("resume=false: starting afresh; removing the earlier attempt's checkpoints in %s", checkpoint_dir)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # ignore_errors: every rank of a job gets here
        return None
    for path in candidates:
        stored = _read_checkpoint(path)
        if stored is _UNREADABLE:
            aside = _set_aside(path)
            log.warning("Checkpoint %s does not load (truncated or damaged): moved to %s", path, aside.name)
            continue
        differences = config_differences(stored, run_config) if isinstance(stored, dict) else []
        if differences:
            raise ConfigError(
                f"This run folder's checkpoint {path} was trained with other settings, so resuming would mix "
                f"them: {'; '.join(differences)}. Fix: run with the checkpoint's values to resume, or add "
                f"resume=false to start afresh in this folder (its checkpoints are removed), or choose a new folder "
                "(hydra.run.dir=<new folder>)."
            )
        log.info("Resuming from %s", path)
        return str(path)
    log.warning("No loadable checkpoint in %s: starting afresh", checkpoint_dir)
    return None


_UNREADABLE = object()


def _read_checkpoint(path: Path) -> Any:
    """The run config stored in a checkpoint (a dict), None when it has none (or is a directory, as
    DeepSpeed writes them), or ``_UNREADABLE`` when the file does not load."""
    if path.is_dir():
        return None
    if not path.is_file():
        return _UNREADABLE
    import torch

    try:  # memory-mapped: the tensors are not read, the archive and the pickle are checked
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception:
        try:  # a checkpoint in torch's legacy (non-zip) format cannot be memory-mapped
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:
            return _UNREADABLE
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        return _UNREADABLE
    stored = checkpoint.get(CONFIG_IN_CHECKPOINT)
    return _flatten(json.loads(stored)) if isinstance(stored, str) else None


def remove_checkpoints(checkpoint_dir: Path) -> None:
    """Delete the run's checkpoints, keeping any set aside as corrupt (the folder goes once empty)."""
    if not checkpoint_dir.is_dir():
        return
    for path in checkpoint_dir.iterdir():
        if ".corrupt" not in path.name:
            _remove_path(path)
    if not any(checkpoint_dir.iterdir()):
        checkpoint_dir.rmdir()


def _set_aside(path: Path) -> Path:
    aside = path.with_name(path.name + ".corrupt")
    number = 1
    while aside.exists():
        number += 1
        aside = path.with_name(f"{path.name}.corrupt{number}")
    try:
        path.rename(aside)
    except FileNotFoundError:  # another rank of the same job moved it first
        pass
    return aside


def _remove_path(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _replace_path(staging: Path, target: Path) -> None:
    """Move ``staging`` (a file or a folder) onto ``target``: at no moment is ``target`` partial."""
    if staging.is_dir() and target.exists():
        old = target.with_name(f"{target.name}.old-{os.getpid()}")
        target.rename(old)  # a folder cannot replace a folder in one step; a crash here leaves staging + old
        staging.rename(target)
        _remove_path(old)
    else:
        os.replace(staging, target)


def _write_atomically(path: Path, text: str) -> None:
    staging = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, path)


class AtomicModelCheckpoint(L.pytorch.callbacks.ModelCheckpoint):
    """``ModelCheckpoint`` that writes each checkpoint to ``<name>.partial`` and renames it into place,
    and stores the run's config in it (so a resume can check it was trained with the same settings).

    Args:
        run_config: :func:`comparable_config` of the run.
        **kwargs: as ``ModelCheckpoint``.
    """

    def __init__(self, run_config: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.run_config_json = json.dumps(run_config, sort_keys=True)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_IN_CHECKPOINT] = self.run_config_json

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        staging = f"{filepath}.partial"
        super()._save_checkpoint(trainer, staging)  # every rank writes its part (DeepSpeed), then a barrier
        if trainer.is_global_zero:
            _replace_path(Path(staging), Path(filepath))
        trainer.strategy.barrier("AtomicModelCheckpoint")
        self._last_checkpoint_saved = filepath


# ---------------------------------------------------------------------------- saving
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
        _write_atomically(output_dir / "data_manifest.json", json.dumps(scrub_credentials(manifest), indent=2))
    _write_atomically(output_dir / "train_summary.json", json.dumps(scrub_credentials(summary), indent=2))
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
    # Written beside and renamed: a folder named model/ is always complete (it marks a finished run).
    staging = model_dir.with_name(f"{model_dir.name}.partial")
    _remove_path(staging)
    staging.mkdir(parents=True)
    model.save_pretrained(staging, state_dict=state_dict)
    tokenizer.save_pretrained(staging)
    _replace_path(staging, model_dir)
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
        raise ValueError(
            "No training length: set trainer.max_steps=<steps>, or trainer.max_epochs=<epochs> with "
            "trainer.max_steps=-1."
        )
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
    return (
        f"Training {what}: {data.get('num_examples')} examples, {batch}, {data.get('max_length')} tokens, "
        f"{length}, lr {cfg.optimizer.lr:g}, {schedule} schedule (warmup {cfg.module.get('warmup_ratio', 0)})"
    )
