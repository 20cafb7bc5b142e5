"""DeepAlign: deep safety alignment by safety-recovery augmentation and a token-wise constrained objective.

Qi, Panda, Lyu, Ma, Roy, Beirami, Mittal and Henderson (2024), "Safety Alignment Should Be Made More
Than Just a Few Tokens Deep" (arXiv:2406.05946; ICLR 2025).

Each step takes a ``safety`` batch of safety-recovery examples ``x -> h_{<=k} ⊕ r`` (harmful prefix
masked, see :mod:`sdd.datamodules.safety_recovery`) and a ``utility`` batch of benign
instruction-answer pairs, and minimises (the paper's augmentation objective, §3.2)::

    α · L_safety(x, h_{<=k}, r)  +  (1 - α) · E_{(x', y') ~ D_benign} [ -log π_θ(y' | x') ]

``L_safety`` is one of:

- ``objective=constrained`` (default): the token-wise constrained fine-tuning objective of §4.1
  (Eq. 3 of the arXiv version), over the refusal tokens ``y_t`` of ``r``::

      Σ_t  -(2/β_t) · log σ( β_t · [log π_θ(y_t | ·) - log π_aligned(y_t | ·)] )

  with ``π_aligned`` the initial model, frozen, and ``β_1 = 0.5``, ``β_t = 2`` for ``t = 2..5``,
  ``β_t = 0.1`` after (the paper's values). Its gradient is the cross-entropy gradient of each token
  weighted by ``2·σ(-β_t Δ_t)``: exactly CE at the initial model (weight 1), CE again as β_t -> 0, and
  vanishing once a token's log-ratio Δ_t exceeds a few 1/β_t (the constraint). This is how the
  design of this project defines DeepAlign (augmentation + token-wise constrained SFT).
- ``objective=sft``: plain cross-entropy on the refusal tokens. The paper's released augmented
  model (Llama-2-7B-Chat-Augmented) was trained this way (the authors' ``--sft_type=sft``); the
  constrained objective is the paper's defence for later fine-tuning (it keeps the first tokens
  close to the aligned model), which here is applied while the augmentation is trained.

Interpretation and choices:
- Tokens are averaged (token-level mean) within each batch, not summed per sequence.
- ``t`` counts the labelled tokens of an example, so ``t = 1`` is the first refusal token, after the
  harmful prefix (the augmented example's response is the refusal; the authors' code does the same).
- α = 0.2: the authors' code mixes 16 safety and 64 utility examples per step (1 : 4); we weight
  the two means explicitly instead. The paper's training: AdamW, lr 2e-5, 10 epochs over 256
  triplets, batch 16 (+64 utility), no warmup.
- The loss value of the constrained objective is ``(2/β_t)·log 2`` per token at the initial model,
  not a cross-entropy; ``train/safety_ce`` logs the refusal tokens' cross-entropy alongside.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from sdd.backbones import Backbone
from sdd.modules.common import FrozenReference
from sdd.modules.ops import answer_logprobs, masked_mean
from sdd.modules.sft import SFTModule

OBJECTIVES = ("constrained", "sft")


def token_betas(
    mask: torch.Tensor, beta: float, prefix_beta: float, first_token_beta: float, prefix_length: int
) -> torch.Tensor:
    """β_t for every labelled position: ``first_token_beta`` for t = 1, ``prefix_beta`` up to
    ``prefix_length``, ``beta`` after; t counts the labelled tokens of each row."""
    position = mask.long().cumsum(-1)  # 1-based index among labelled tokens
    betas = torch.full(mask.shape, float(beta), device=mask.device)
    betas = torch.where(position <= prefix_length, torch.full_like(betas, prefix_beta), betas)
    return torch.where(position == 1, torch.full_like(betas, first_token_beta), betas)


def constrained_loss(
    policy_logps: torch.Tensor, reference_logps: torch.Tensor, betas: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Token mean of ``-(2/β_t) log σ(β_t (log π_θ - log π_ref))`` over labelled tokens."""
    per_token = -(2.0 / betas) * F.logsigmoid(betas * (policy_logps - reference_logps))
    return masked_mean(per_token, mask)


class DeepAlignModule(SFTModule):
    """Safety-recovery augmentation with the token-wise constrained objective, mixed with utility data.

    Args:
        objective: ``constrained`` (Eq. 3, needs the frozen initial model) or ``sft`` (cross-entropy).
        alpha: weight of the safety loss; ``1 - alpha`` weighs the utility cross-entropy.
        beta, prefix_beta, first_token_beta, prefix_length: the β_t schedule of Eq. 3.
        safety_stream, utility_stream: names of the two streams of the batch.
        Others as :class:`SFTModule`.
    """

    streams = ("safety", "utility")
    data_config = "deepalign"

    def __init__(
        self,
        backbone: Backbone,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        objective: str = "constrained",
        alpha: float = 0.2,
        beta: float = 0.1,
        prefix_beta: float = 2.0,
        first_token_beta: float = 0.5,
        prefix_length: int = 5,
        safety_stream: str = "safety",
        utility_stream: str = "utility",
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, optimizer, scheduler, **kwargs)
        if objective not in OBJECTIVES:
            raise ValueError(f"module.objective must be one of {OBJECTIVES}, got '{objective}'.")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"module.alpha must be in [0, 1], got {alpha}.")
        if min(beta, prefix_beta, first_token_beta) <= 0:
            raise ValueError("module.beta, prefix_beta and first_token_beta must be positive (β_t > 0).")
        self.reference: FrozenReference | None = None

    def configure_model(self) -> None:
        super().configure_model()
        if self.hparams.objective == "constrained" and self.reference is None:
            self.reference = FrozenReference(self)

    def safety_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L_safety, cross-entropy)`` on the labelled (refusal) tokens of a safety batch."""
        logits = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        logps, mask = answer_logprobs(logits, batch["labels"])
        cross_entropy = masked_mean(-logps, mask)
        if self.hparams.objective == "sft":
            return cross_entropy, cross_entropy
        with torch.no_grad(), self.reference.active() as reference:
            reference_logits = reference(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            ).logits
            reference_logps, _ = answer_logprobs(reference_logits, batch["labels"])
        hp = self.hparams
        betas = token_betas(mask, hp.beta, hp.prefix_beta, hp.first_token_beta, hp.prefix_length)
        return constrained_loss(logps, reference_logps, betas, mask), cross_entropy

    def _losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        safety, safety_ce = self.safety_loss(batch[self.hparams.safety_stream])
        utility = self.cross_entropy(batch[self.hparams.utility_stream])
        alpha = self.hparams.alpha
        return {
            "loss": alpha * safety + (1 - alpha) * utility,
            "safety_loss": safety,
            "safety_ce": safety_ce,
            "utility_loss": utility,
        }

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self._losses(batch)["loss"]

    def _shared_step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        losses = self._losses(batch)
        self.log_metrics(stage, losses, batch_size=batch[self.hparams.safety_stream]["input_ids"].shape[0])
        return losses["loss"]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")
