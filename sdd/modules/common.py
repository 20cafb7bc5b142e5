"""Pieces shared by the defense objectives: per-token answer log-probabilities, a frozen reference,
and the optimizer step of manual-optimization modules.

SimPO and DeepAlign compare log-probabilities of answer tokens; DeepAlign and TAR compare the trained
model with the initial (aligned) one; SEAM, Booster and TAR take several passes per step and step the
optimizer themselves. Each is defined once here.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

from sdd.chat import IGNORE_INDEX


def answer_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log π(y_t | x, y_<t)`` of every labelled token, aligned with the causal shift.

    Args:
        logits: ``[batch, seq, vocab]`` from a causal LM.
        labels: ``[batch, seq]`` token ids, ``ignore_index`` where no loss is taken.

    Returns:
        ``(logps, mask)``, both ``[batch, seq - 1]``: the log-probability of token ``t + 1`` given the
        tokens up to ``t`` (0 where masked) and whether that position carries a label.
    """
    shifted_labels = labels[:, 1:]
    shifted_logits = logits[:, :-1].float()
    mask = shifted_labels != ignore_index
    # cross_entropy is the fused log_softmax + gather; ignored positions come back as 0.
    nll = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        shifted_labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="none",
    )
    return -nll.view(shifted_labels.shape), mask


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is true (0 if nothing is)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


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
            raise ValueError(f"{type(self).__name__} steps once per batch: set trainer.accumulate_grad_batches=1 "
                             "(raise data.batch_size instead).")
        return []

    def clip_and_step(self, optimizer) -> None:
        clip_value, clip_algorithm = self._clip
        if clip_value:
            self.clip_gradients(optimizer, gradient_clip_val=clip_value, gradient_clip_algorithm=clip_algorithm)
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
