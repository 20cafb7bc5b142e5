"""Supervised fine-tuning of a causal LM: the objective of SDD, SDD_reject, safety alignment and attacks,
and the base class (the contract) of every defense objective.

The loss is the token-level cross-entropy on answer tokens only: the data modules set every prompt
and padding label to -100 (:func:`sdd.modules.ops.model_cross_entropy`).

The contract a defense module follows (see the README's "Add a defense"):

- ``streams``: the roles of the data streams a training batch ``{stream: batch}`` must hold; the stream
  of role ``r`` is the hyper-parameter ``r_stream`` when the module has one (renamable in config), else
  ``r``. :meth:`SFTModule.required_streams` may drop roles a setting switches off. ``data_config`` names
  the ``conf/data/`` entry that provides them. One check at setup (:meth:`SFTModule.check_streams`)
  refuses data without them, with one :class:`sdd.errors.DataStreamError`.
- hyper-parameters are saved by ``save_hyperparameters`` and read as ``self.hparams.<name>``;
- losses are logged by :meth:`SFTModule.log_metrics` (``<stage>/<name>``, plus ``train/lr``).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import lightning as L
import torch

from sdd.backbones import Backbone
from sdd.datamodules.streams import batch_streams
from sdd.errors import DataStreamError
from sdd.modules.ops import model_cross_entropy, trainable_parameters


class SFTModule(L.LightningModule):
    """Cross-entropy fine-tuning of a causal LM on masked labels.

    Args:
        backbone: loads the model (in :meth:`configure_model`, so sharded strategies can wrap it).
        optimizer: a partial optimizer (``torch.optim.AdamW``, ``torch.optim.SGD`` ...) given params.
        scheduler: a partial ``transformers.get_scheduler`` (``constant``, ``cosine`` ...) given the
            optimizer and the warmup / total step counts; null for a constant learning rate.
        warmup_ratio: share of the total steps spent in linear warmup.
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% slower).
        lora: null for full fine-tuning, or ``peft.LoraConfig`` arguments (``r``, ``lora_alpha``,
            ``lora_dropout``, ``target_modules``) to train low-rank adapters only.
    """

    # False for objectives that read or edit whole gradients and weights between several passes of one
    # step (SEAM, Booster, TAR, ...): DeepSpeed ZeRO partitions both, so training.py refuses the pair.
    supports_deepspeed: bool = True
    # The roles of the streams of a training batch (none: a plain batch) and the conf/data entry with them.
    streams: tuple[str, ...] = ()
    data_config: str | None = None

    def __init__(
        self,
        backbone: Backbone,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        warmup_ratio: float = 0.0,
        gradient_checkpointing: bool = False,
        lora: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if lora is not None and not isinstance(lora, dict):  # a DictConfig from Hydra
            from omegaconf import OmegaConf

            lora = OmegaConf.to_container(lora, resolve=True)
        self.save_hyperparameters(ignore=["backbone", "optimizer", "scheduler"])
        self.backbone = backbone
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.model: torch.nn.Module | None = None
        self._step_started: float | None = None

    # ------------------------------------------------------------------ the defense contract
    def required_streams(self) -> dict[str, str]:
        """Role -> data stream name, for every stream a training step reads.

        The name is the hyper-parameter ``<role>_stream`` when there is one, else the role itself.
        Override to drop the roles that a setting switches off.
        """
        return {role: self.hparams.get(f"{role}_stream") or role for role in self.streams}

    def check_streams(self, available: Sequence[str]) -> None:
        """Refuse data that lacks a stream this objective reads, naming the data config to use.

        Raises:
            DataStreamError: a required stream is not among ``available``.
        """
        missing = {role: name for role, name in self.required_streams().items() if name not in available}
        if not missing:
            return
        wrong = ", ".join(
            f"module.{role}_stream={name!r}" if f"{role}_stream" in self.hparams else f"stream {name!r}"
            for role, name in missing.items()
        )
        raise DataStreamError(
            f"{type(self).__name__} reads streams the data does not provide: {wrong}; the data's streams are "
            f"{sorted(available)}. Fix: use data={self.data_config} (conf/data/{self.data_config}.yaml), or set "
            "the module.*_stream keys to streams of data.streams."
        )

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and self.streams:
            self.check_streams(batch_streams(datamodule))

    def log_metrics(
        self,
        stage: str,
        metrics: Mapping[str, Any],
        batch_size: int,
        prog_bar: Sequence[str] = ("loss",),
        learning_rate: bool = True,
    ) -> None:
        """Log every metric as ``<stage>/<name>`` (tensors detached); in training also ``train/lr``.

        Args:
            stage: ``train`` or ``val``.
            metrics: name -> value (tensor or number).
            batch_size: the examples the values average over.
            prog_bar: names also shown in the progress bar.
            learning_rate: log ``train/lr`` too (in training; once per step).
        """
        for name, value in metrics.items():
            value = value.detach() if isinstance(value, torch.Tensor) else value
            self.log(f"{stage}/{name}", value, prog_bar=name in prog_bar, batch_size=batch_size)
        if stage == "train" and learning_rate:
            self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=1)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The weights the optimizer updates."""
        return trainable_parameters(self.model)

    # ------------------------------------------------------------------ model, loss, steps
    def configure_model(self) -> None:
        if self.model is not None:
            return
        if getattr(self._trainer, "strategy", None) is not None and getattr(
            self.trainer.strategy, "zero_stage_3", False
        ):
            # Makes from_pretrained ZeRO-3 aware: weights are loaded shard by shard, never whole per rank.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_deepspeed_config = HfDeepSpeedConfig(self.trainer.strategy.config)
        self.model = self.backbone.load_model()
        if self.hparams.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.config.use_cache = False
        if self.hparams.lora:
            from peft import LoraConfig, get_peft_model

            if self.hparams.gradient_checkpointing:
                self.model.enable_input_require_grads()  # frozen embeddings would cut the graph
            self.model = get_peft_model(self.model, LoraConfig(task_type="CAUSAL_LM", **dict(self.hparams.lora)))
        self.model.train()

    def teardown(self, stage: str) -> None:
        if getattr(self, "_hf_deepspeed_config", None) is not None:
            # Later from_pretrained calls in this process (evaluation, tests) must load whole models again.
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            self._hf_deepspeed_config = None

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over the batch's answer tokens."""
        return self.cross_entropy(batch)

    def cross_entropy(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token-mean cross-entropy of one (single-stream) batch's answer tokens."""
        return model_cross_entropy(self.model, batch)[0]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        self.log_metrics("train", {"loss": loss}, batch_size=batch["input_ids"].shape[0])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._step_started
        self.log("train/tokens_per_second", count_tokens(batch) / max(elapsed, 1e-9), batch_size=1)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        self.log_metrics("val", {"loss": loss}, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(
            optimizer=optimizer,
            num_warmup_steps=int(self.hparams.warmup_ratio * total),
            num_training_steps=total,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def count_tokens(batch: Any) -> int:
    """Non-padding tokens in a batch, or in every stream of a ``{stream: batch}`` dict."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum().item())
    return sum(count_tokens(stream) for stream in batch.values() if isinstance(stream, dict))
