"""SimPO: reference-free, length-normalised preference optimisation, as a safety-alignment baseline.

Meng, Xia and Chen (2024), "SimPO: Simple Preference Optimization with a Reference-Free Reward"
(NeurIPS 2024), Eq. 6::

    L = -log σ( β/|y_w| · log π(y_w|x)  -  β/|y_l| · log π(y_l|x)  -  γ )

The implicit reward of an answer is its average token log-probability scaled by β (Eq. 4); no
reference model is needed. Here the preference pairs are safety pairs (``corpus.safety_pairs``): a
harmful prompt with its safe answer as ``y_w`` (chosen) and an unsafe answer as ``y_l`` (rejected),
built by :class:`sdd.datamodules.PreferenceDataModule`.

Interpretation and choices:
- |y| counts the answer tokens that carry a label through :mod:`sdd.chat`: the answer and the
  template's end-of-turn marker (the answer the model must produce), not the prompt.
- β = 2.5 and γ = 1.375 (γ/β = 0.55) are the values of the authors' Llama-3-8B-Instruct setting (the
  paper tunes β ∈ [2, 2.5] and γ/β ∈ [0.3, 0.8] per model); lr 1e-6, cosine schedule, warmup 0.1 and
  batch 128 are their training setting (set them with optimizer / scheduler / data overrides).
- Chosen and rejected answers go through the model in one concatenated forward pass.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from sdd.backbones import Backbone
from sdd.chat import IGNORE_INDEX
from sdd.modules.ops import answer_logprobs
from sdd.modules.sft import SFTModule


def simpo_loss(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float, gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair SimPO loss and reward margin from average answer log-probabilities.

    Returns:
        ``(losses, margins)``: ``softplus(γ - margin)`` (= ``-log σ(margin - γ)``) and
        ``margin = β·(avg log π(y_w|x) - avg log π(y_l|x))``.
    """
    margins = beta * (chosen_logps - rejected_logps)
    return F.softplus(gamma - margins), margins


class SimPOModule(SFTModule):
    """SimPO on ``{"chosen": batch, "rejected": batch}`` preference batches.

    Args:
        beta: reward scale β (Eq. 4 of the paper).
        gamma: target reward margin γ (Eq. 6).
        Others as :class:`SFTModule`.
    """

    streams = ("chosen", "rejected")
    data_config = "simpo"

    def __init__(
        self,
        backbone: Backbone,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        beta: float = 2.5,
        gamma: float = 1.375,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, optimizer, scheduler, **kwargs)
        if beta <= 0:
            raise ValueError(f"module.beta must be positive (the paper uses 2.0-2.5), got {beta}.")

    def average_logprobs(self, batch: dict[str, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Length-normalised log-likelihood of the chosen and of the rejected answers, one pass."""
        chosen, rejected = batch["chosen"], batch["rejected"]
        width = max(chosen["input_ids"].shape[1], rejected["input_ids"].shape[1])

        def padded(key: str, value: int) -> torch.Tensor:
            return torch.cat(
                [F.pad(side[key], (0, width - side[key].shape[1]), value=value) for side in (chosen, rejected)]
            )

        labels = padded("labels", IGNORE_INDEX)
        logits = self.model(
            input_ids=padded("input_ids", 0), attention_mask=padded("attention_mask", 0), use_cache=False
        ).logits
        logps, mask = answer_logprobs(logits, labels)
        average = logps.sum(-1) / mask.sum(-1).clamp(min=1)
        num_pairs = chosen["input_ids"].shape[0]
        return average[:num_pairs], average[num_pairs:]

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """Mean SimPO loss of a preference batch."""
        return self._loss_and_metrics(batch)[0]

    def _loss_and_metrics(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen_logps, rejected_logps = self.average_logprobs(batch)
        hp = self.hparams
        losses, margins = simpo_loss(chosen_logps, rejected_logps, hp.beta, hp.gamma)
        metrics = {
            "reward_margin": margins.detach().mean(),
            "reward_accuracy": (margins.detach() > 0).float().mean(),
            "reward_chosen": hp.beta * chosen_logps.detach().mean(),
            "reward_rejected": hp.beta * rejected_logps.detach().mean(),
        }
        return losses.mean(), metrics

    def _shared_step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        loss, metrics = self._loss_and_metrics(batch)
        self.log_metrics(
            stage,
            {"loss": loss, **metrics},
            batch_size=batch["chosen"]["input_ids"].shape[0],
            prog_bar=("loss", "reward_accuracy"),
        )
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")
