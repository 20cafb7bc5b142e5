"""LightningModule building blocks shared by the defense objectives: a frozen reference and the optimizer
step of manual-optimization modules (the operations on models and losses are in :mod:`sdd.modules.ops`).

DeepAlign and TAR compare the trained model with the initial (aligned) one; SEAM, Booster and TAR take
several passes per step and step the optimizer themselves. Each is defined once here.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class FrozenReference:
    """The initial model, frozen: the reference of constrained / representation-preserving objectives.

    With LoRA the reference is the same network with its adapters switched off (no second copy);
    otherwise a second copy is loaded from the backbone, in eval mode, without gradients. It is kept
    out of the LightningModule's submodules, so checkpoints and the optimizer never see it; it
    follows the trained model's device on first use.
    """

    def __init__(self, module) -> None:
        self.module = module
        self.model = None
        if not module.hparams.get("lora"):
            strategy = getattr(module._trainer, "strategy", None) if module._trainer is not None else None
            if getattr(strategy, "zero_stage_3", False):
                raise ValueError(
                    f"{type(module).__name__} needs a frozen copy of the initial model, which ZeRO-3 would shard "
                    "outside the engine. Use trainer=deepspeed_zero2 (or gpu), or train LoRA adapters "
                    "(module.lora=...), whose reference is the base model with adapters disabled."
                )
            self.model = module.backbone.load_model()
            self.model.eval()
            self.model.requires_grad_(False)

    @contextlib.contextmanager
    def active(self) -> Iterator[torch.nn.Module]:
        """The reference network, for use under ``torch.no_grad()``."""
        if self.model is None:  # LoRA: the base weights are the initial model
            with self.module.model.disable_adapter():
                yield self.module.model
            return
        device = self.module.device
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        yield self.model


class ManualStepMixin:
    """Manual optimization that still honours ``trainer.gradient_clip_val`` and steps the scheduler."""

    _clip: tuple[float | None, str | None] = (None, None)

    def configure_callbacks(self) -> list:
        # Lightning refuses gradient_clip_val with manual optimization: take it over, clip ourselves.
        if self._trainer is not None and self.trainer.gradient_clip_val:
            self._clip = (float(self.trainer.gradient_clip_val), self.trainer.gradient_clip_algorithm)
            self.trainer.gradient_clip_val = None
        if self._trainer is not None and self.trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"{type(self).__name__} steps once per batch: set trainer.accumulate_grad_batches=1 "
                "(raise data.batch_size instead)."
            )
        return []

    def clip_and_step(self, optimizer) -> None:
        clip_value, clip_algorithm = self._clip
        if clip_value:
            self.clip_gradients(optimizer, gradient_clip_val=clip_value, gradient_clip_algorithm=clip_algorithm)
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
