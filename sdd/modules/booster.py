"""Booster: alignment with a regulariser that attenuates the harmful perturbation.

Huang, Hu, Ilhan, Tekin and Liu (2024), "Booster: Tackling Harmful Fine-tuning for Large Language
Models via Attenuating Harmful Perturbation" (arXiv:2409.01586; ICLR 2025), the Booster objective and
Algorithm 1::

    min_w  f(w) + λ · [ h(w) - h( w - α · ∇h(w) / ‖∇h(w)‖ ) ]

with ``f`` the alignment loss (cross-entropy of refusals to harmful prompts) and ``h`` the harmful
loss (cross-entropy of harmful answers). The bracket is how much one normalised step of harmful
fine-tuning would reduce the harmful loss; Booster makes that reduction small.

The update direction is the paper's first-order one (Algorithm 1): with
``w̃ = w - α ∇h(w)/‖∇h(w)‖``,

    g = ∇f(w) + λ · ( ∇h(w) - ∇h(w̃) )

(the dependence of w̃ on w is ignored, no Hessian term). Each step takes three passes: ∇h at w,
∇h at w̃ (weights moved in place, then restored exactly from a copy), and ∇f at w; the sum is
clipped as the trainer says and handed to the optimizer.

Interpretation and choices:
- f and h are token-mean cross-entropies of the answer tokens (prompt masked). A harmful batch with
  no labelled token has h ≡ 0 (no gradient, no perturbation): the step is then plain alignment.
- ‖∇h‖ is the global norm over all trainable weights; 1e-7 is added to it, as in the authors' code.
- ``train/loss`` logs the objective ``f + λ(h(w) - h(w̃))`` whose first-order gradient is applied.
- Paper settings (Llama-2-7B, LoRA r=8, α_lora=4): λ = 5, α = 0.1, AdamW lr 5e-4, weight decay 0.1,
  constant schedule, batch 10 alignment + 10 harmful examples, 20 epochs over 5K alignment and
  5K harmful examples (BeaverTails).
- The harmful passes use ``torch.autograd.grad`` (no loss scaling: use fp32 or bf16, not fp16);
  under DDP the harmful gradients are averaged across ranks before the perturbation, so every rank
  moves to the same w̃. DeepSpeed is not supported (whole weights and gradients are edited).
- The exact restore keeps one copy of the trainable weights (cheap with LoRA).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from sdd.backbones import Backbone
from sdd.modules.common import ManualStepMixin
from sdd.modules.ops import global_norm, restored
from sdd.modules.sft import SFTModule


class BoosterModule(ManualStepMixin, SFTModule):
    """Booster on ``{"alignment": batch, "harmful": batch}`` steps (manual optimization).

    Args:
        lam: λ, the weight of the harmful-perturbation regulariser.
        alpha: α, the length of the simulated normalised harmful step.
        alignment_stream, harmful_stream: names of the two streams of the batch.
        Others as :class:`SFTModule`.
    """

    supports_deepspeed = False  # weights are moved and restored, gradients combined, between passes
    streams = ("alignment", "harmful")
    data_config = "booster"

    def __init__(
        self,
        backbone: Backbone,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        lam: float = 5.0,
        alpha: float = 0.1,
        alignment_stream: str = "alignment",
        harmful_stream: str = "harmful",
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, optimizer, scheduler, **kwargs)
        if lam < 0 or alpha < 0:
            raise ValueError(f"module.lam and module.alpha must be >= 0, got lam={lam}, alpha={alpha}.")
        self.automatic_optimization = False

    def _harmful_gradient(self, batch: dict[str, torch.Tensor], params: list[torch.nn.Parameter]):
        loss = self.cross_entropy(batch)
        grads = torch.autograd.grad(loss, params, allow_unused=True) if loss.requires_grad else [None] * len(params)
        grads = [g if g is not None else torch.zeros_like(p) for p, g in zip(params, grads)]
        if self._trainer is not None and self.trainer.world_size > 1:
            grads = [self.trainer.strategy.reduce(g, reduce_op="mean") for g in grads]
        return loss.detach(), grads

    def regularizer_gradient(
        self, harmful: dict[str, torch.Tensor]
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """``∇h(w) - ∇h(w̃)`` for every trainable weight; the weights are restored bit for bit.

        Returns:
            The gradient (before λ), and ``harmful_loss`` h(w), ``perturbed_harmful_loss`` h(w̃),
            ``regularizer`` h(w) - h(w̃) and ``harmful_grad_norm`` ‖∇h(w)‖.
        """
        params = self.trainable_parameters()
        loss, grads = self._harmful_gradient(harmful, params)
        norm = global_norm(grads)
        scale = self.hparams.alpha / (norm + 1e-7)
        with restored(params):
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_((g.float() * scale).to(p.dtype))
            perturbed_loss, perturbed_grads = self._harmful_gradient(harmful, params)
        difference = [g - g_tilde for g, g_tilde in zip(grads, perturbed_grads)]
        return difference, {
            "harmful_loss": loss,
            "perturbed_harmful_loss": perturbed_loss,
            "regularizer": loss - perturbed_loss,
            "harmful_grad_norm": norm,
        }

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """The alignment loss f (validation)."""
        return self.cross_entropy(batch[self.hparams.alignment_stream])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        optimizer = self.optimizers()
        optimizer.zero_grad()
        difference, stats = self.regularizer_gradient(batch[hp.harmful_stream])
        alignment_loss = self(batch)
        self.manual_backward(alignment_loss)
        for p, d in zip(self.trainable_parameters(), difference):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(d.to(p.grad.dtype), alpha=hp.lam)
        self.clip_and_step(optimizer)

        metrics = {
            "loss": alignment_loss.detach() + hp.lam * stats["regularizer"],
            "alignment_loss": alignment_loss,
            **stats,
        }
        self.log_metrics("train", metrics, batch_size=batch[hp.alignment_stream]["input_ids"].shape[0])
        return alignment_loss.detach()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        self.log_metrics("val", {"loss": loss}, batch_size=batch[self.hparams.alignment_stream]["input_ids"].shape[0])
        return loss
