"""Supervised fine-tuning of a causal LM: the objective of SDD, SDD_reject, safety alignment and attacks.

The loss is the token-level cross-entropy on answer tokens only: the data modules set every prompt
and padding label to -100, which ``transformers`` ignores.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import lightning as L
import torch

from sdd.backbones import Backbone


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

    def configure_model(self) -> None:
        if self.model is not None:
            return
        if getattr(self._trainer, "strategy", None) is not None and getattr(self.trainer.strategy, "zero_stage_3", False):
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
        output = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        )
        return output.loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch_size)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._step_started
        self.log("train/tokens_per_second", count_tokens(batch) / max(elapsed, 1e-9), batch_size=1)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params=params)
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
