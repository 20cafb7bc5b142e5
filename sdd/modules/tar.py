"""TAR: tamper-resistant training by first-order meta-learning against simulated fine-tuning attacks.

Tamirisa, Bharathi, Phan, Zhou, Gatti, Suresh, Lin, Wang, Wang, Arel, Zou, Song, Li, Hendrycks and
Mazeika (2024), "Tamper-Resistant Safeguards for Open-Weight LLMs" (arXiv:2408.00761; ICLR 2025),
Algorithm 1 and Eq. 1::

    min_θ  λ_TR · E_{attack ~ A} [ L_TR( attack(θ); x_TR ) ]  +  λ_retain · L_retain(θ; x_r)

Each outer step:

1. samples an attack: an optimizer (AdamW or SGD) and a learning rate from ``attack_lrs``, run for
   K = ``inner_steps`` steps of cross-entropy on harmful data, starting from the current weights θ;
2. at the adapted weights θ_k (every ``tr_every`` inner steps and at θ_K) takes the gradient of the
   tamper-resistance loss on a held-out harmful batch x_TR, and sums them with weights w_k
   (first-order approximation: ∇_θ L_TR(θ_k) is replaced by ∇_{θ_k} L_TR(θ_k), no second
   derivatives through the inner loop);
3. restores θ exactly (a copy of the trainable weights is put back; the attack's optimizer is
   discarded);
4. adds ``tr_weight`` times that sum to the gradient of the retain loss at θ and takes one step of
   the outer optimizer.

Interpretation and choices:
- Tamper-resistance loss ``tr_loss``: ``max_entropy`` (default) is the paper's: minus the entropy of
  the next-token distribution, here over the held-out batch's answer positions (the authors' code
  averages over every position). The paper uses it to keep weaponisation knowledge unrecoverable;
  for harmful-request refusal it uses a DPO loss instead, which is not implemented here.
  ``neg_ce`` (minus the cross-entropy of the harmful answers) is offered as the plain unlearning
  alternative; it is unbounded below.
- Weights w_k: ``exponential`` is the paper's schedule ``exp(λ·(k - K))`` (λ = ``schedule_lambda``,
  1 at θ_K, later attack steps weigh more); ``uniform`` averages the evaluated points. With K = 0
  the only point is θ itself (w = 1): the term is the plain gradient of L_TR.
- Retain loss: cross-entropy on benign data plus, with ``representation_weight > 0``, the paper's
  representation term: the L2 distance between the hidden states of θ and of the initial model on
  the retain batch, averaged over tokens and layers.
- Data: one ``harmful`` batch per step is split into the held-out x_TR (its first ``tr_batch_size``
  rows) and micro-batches of ``attack_batch_size`` rows for the K attack steps, cycled when K
  exceeds their number (the authors draw a fresh batch for each inner step: for that, raise
  ``data.streams.harmful.batch_size`` to ``tr_batch_size + K·attack_batch_size``).
- The paper's attack distribution also mixes benign and "retain-then-forget" attacks; here every
  simulated attack fine-tunes on the harmful stream.
- Defaults are the paper's (biosecurity run): K = 64, TR gradient every 4 inner steps, λ_TR = 4,
  λ = 0.0625, attack lrs {2e-6, 2e-5, 4e-5} with AdamW, attack batch 4; outer AdamW lr 2e-5, 750
  steps, 32 warmup steps, batch 8 (set those with optimizer / trainer / data overrides).
- The inner loop computes gradients with ``torch.autograd.grad`` in full precision (no loss
  scaling, no DDP synchronisation); under DDP the TR gradient is averaged across ranks. DeepSpeed is
  not supported (the inner loop rewrites whole parameters).
"""

from __future__ import annotations

import math
import random
import warnings
from typing import Any, Callable, Sequence

import torch

from sdd.backbones import Backbone
from sdd.chat import IGNORE_INDEX
from sdd.modules.common import FrozenReference, ManualStepMixin
from sdd.modules.ops import masked_mean, model_cross_entropy, restored
from sdd.modules.sft import SFTModule

TR_LOSSES = ("max_entropy", "neg_ce")
SCHEDULES = ("exponential", "uniform")
ATTACK_OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}

# Lightning warns that manual-optimization checkpoints hold the weights after the step: that is the
# state consistent with the saved global step, which resuming needs.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)


def take_rows(batch: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    """Rows of a right-padded batch, with the padding columns no row needs dropped."""
    width = int(batch["attention_mask"][rows].sum(-1).max().item())
    return {key: value[rows, :width] for key, value in batch.items()}


class TARModule(ManualStepMixin, SFTModule):
    """Tamper-Attack Resistance on ``{"harmful": batch, "retain": batch}`` steps (manual optimization).

    Args:
        tr_weight: λ_TR, the weight of the tamper-resistance gradient.
        inner_steps: K, the simulated attack's optimizer steps.
        attack_optimizer: ``adamw`` or ``sgd``.
        attack_lrs: learning rates; each outer step draws one.
        attack_batch_size: rows per attack step.
        tr_batch_size: rows of the harmful batch held out as x_TR.
        tr_every: evaluate the TR gradient every this many inner steps (and at θ_K).
        tr_loss: ``max_entropy`` or ``neg_ce``.
        schedule: ``exponential`` (paper) or ``uniform`` weights of the evaluated points.
        schedule_lambda: λ of the exponential schedule.
        retain_weight: weight of the retain cross-entropy.
        representation_weight: weight of the hidden-state distance to the initial model (0: off,
            no reference model is loaded).
        harmful_stream, retain_stream: names of the two streams of the batch.
        seed: draws of the attack learning rate.
        Others as :class:`SFTModule`.
    """

    supports_deepspeed = False  # the inner loop rewrites whole parameters
    streams = ("harmful", "retain")
    data_config = "tar"

    def __init__(
        self,
        backbone: Backbone,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        tr_weight: float = 4.0,
        inner_steps: int = 64,
        attack_optimizer: str = "adamw",
        attack_lrs: Sequence[float] = (2e-6, 2e-5, 4e-5),
        attack_batch_size: int = 4,
        tr_batch_size: int = 4,
        tr_every: int = 4,
        tr_loss: str = "max_entropy",
        schedule: str = "exponential",
        schedule_lambda: float = 0.0625,
        retain_weight: float = 1.0,
        representation_weight: float = 1.0,
        harmful_stream: str = "harmful",
        retain_stream: str = "retain",
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        attack_lrs = [float(lr) for lr in attack_lrs]
        super().__init__(backbone, optimizer, scheduler, **kwargs)
        if inner_steps < 0 or tr_every < 1 or attack_batch_size < 1 or tr_batch_size < 1:
            raise ValueError("module.inner_steps must be >= 0; tr_every, attack_batch_size, tr_batch_size >= 1.")
        if attack_optimizer not in ATTACK_OPTIMIZERS:
            raise ValueError(
                f"module.attack_optimizer must be one of {sorted(ATTACK_OPTIMIZERS)}, got '{attack_optimizer}'."
            )
        if not attack_lrs or min(attack_lrs) <= 0:
            raise ValueError("module.attack_lrs must list positive learning rates, e.g. [2e-6, 2e-5, 4e-5].")
        if tr_loss not in TR_LOSSES:
            raise ValueError(f"module.tr_loss must be one of {TR_LOSSES}, got '{tr_loss}'.")
        if schedule not in SCHEDULES:
            raise ValueError(f"module.schedule must be one of {SCHEDULES}, got '{schedule}'.")
        self.automatic_optimization = False
        self.attack_lrs = attack_lrs
        self.reference: FrozenReference | None = None
        self._rng = random.Random(seed)

    def configure_model(self) -> None:
        super().configure_model()
        if self.hparams.representation_weight > 0 and self.reference is None:
            self.reference = FrozenReference(self)

    # ------------------------------------------------------------------ losses
    def tamper_resistance_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """L_TR on the held-out harmful batch at the current weights."""
        if self.hparams.tr_loss == "neg_ce":
            return -self.cross_entropy(batch)
        logits = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return -masked_mean(entropy, batch["labels"][:, 1:] != IGNORE_INDEX)

    def retain_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Cross-entropy on benign data plus the hidden-state distance to the initial model."""
        hp = self.hparams
        use_representations = hp.representation_weight > 0
        retain_ce, output = model_cross_entropy(self.model, batch, output_hidden_states=use_representations)
        losses = {"retain_ce": retain_ce}
        total = hp.retain_weight * retain_ce
        if use_representations:
            with torch.no_grad(), self.reference.active() as reference:
                initial = reference(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    output_hidden_states=True,
                    use_cache=False,
                ).hidden_states
            mask = batch["attention_mask"].bool()
            distance = torch.stack(
                [
                    masked_mean((h.float() - h0.float()).norm(dim=-1), mask)
                    for h, h0 in zip(output.hidden_states, initial)
                ]
            ).mean()
            losses["representation_distance"] = distance
            total = total + hp.representation_weight * distance
        losses["retain_loss"] = total
        return losses

    # ------------------------------------------------------------------ the meta-gradient
    def evaluation_weights(self) -> dict[int, float]:
        """Inner steps k at which ∇L_TR(θ_k) is taken, with their weights w_k (k = 0 is θ itself)."""
        hp = self.hparams
        steps = (
            [0]
            if hp.inner_steps == 0
            else sorted({k for k in range(1, hp.inner_steps + 1) if k % hp.tr_every == 0} | {hp.inner_steps})
        )
        if hp.schedule == "uniform":
            return {k: 1.0 / len(steps) for k in steps}
        return {k: math.exp(hp.schedule_lambda * (k - hp.inner_steps)) for k in steps}

    def split_harmful(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
        """The held-out batch x_TR and the attack micro-batches, from one harmful batch."""
        rows = batch["input_ids"].shape[0]
        held_out = min(self.hparams.tr_batch_size, rows - 1) if rows > 1 else 1
        start = held_out if rows > 1 else 0  # a one-row batch serves as both
        size = self.hparams.attack_batch_size
        attacks = [take_rows(batch, slice(i, min(i + size, rows))) for i in range(start, rows, size)]
        return take_rows(batch, slice(0, held_out)), attacks

    def tamper_resistance_gradient(
        self,
        attack_batches: Sequence[dict[str, torch.Tensor]],
        held_out: dict[str, torch.Tensor],
        attack_lr: float | None = None,
    ) -> tuple[list[torch.Tensor], dict[str, float]]:
        """Σ_k w_k ∇L_TR(θ_k) over a simulated attack from the current weights, which are restored.

        Returns:
            One gradient per trainable parameter (before ``tr_weight``), and diagnostics.
        """
        hp = self.hparams
        params = self.trainable_parameters()
        weights = self.evaluation_weights()
        lr = self._rng.choice(self.attack_lrs) if attack_lr is None else attack_lr
        total = [torch.zeros_like(p) for p in params]
        tr_losses, attack_losses, weighted = [], [], 0.0

        def accumulate(step: int) -> None:
            nonlocal weighted
            loss = self.tamper_resistance_loss(held_out)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for acc, grad in zip(total, grads):
                if grad is not None:
                    acc.add_(grad, alpha=weights[step])
            tr_losses.append(loss.item())
            weighted += weights[step] * tr_losses[-1]

        attack = ATTACK_OPTIMIZERS[hp.attack_optimizer](params, lr=lr)
        try:
            with restored(params):
                if 0 in weights:
                    accumulate(0)
                for step in range(1, hp.inner_steps + 1):
                    loss = self.cross_entropy(attack_batches[(step - 1) % len(attack_batches)])
                    # autograd.grad, not backward: no DDP gradient hooks, no Lightning precision plugin.
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                    for p, grad in zip(params, grads):
                        p.grad = grad
                    attack.step()
                    attack_losses.append(loss.item())
                    if step in weights:
                        accumulate(step)
        finally:
            for p in params:
                p.grad = None
            del attack
        diagnostics = {"tr_loss": sum(tr_losses) / len(tr_losses), "tr_objective": weighted, "attack_lr": lr}
        if attack_losses:
            diagnostics.update(attack_loss_first=attack_losses[0], attack_loss_last=attack_losses[-1])
        return total, diagnostics

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """The retain loss (the part of the objective evaluated at θ)."""
        return self.retain_loss(batch[self.hparams.retain_stream])["retain_loss"]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        optimizer = self.optimizers()
        held_out, attacks = self.split_harmful(batch[hp.harmful_stream])
        tr_gradient, diagnostics = self.tamper_resistance_gradient(attacks, held_out)
        if self.trainer.world_size > 1:
            tr_gradient = [self.trainer.strategy.reduce(g, reduce_op="mean") for g in tr_gradient]

        optimizer.zero_grad()
        losses = self.retain_loss(batch[hp.retain_stream])
        self.manual_backward(losses["retain_loss"])
        for p, grad in zip(self.trainable_parameters(), tr_gradient):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(grad, alpha=hp.tr_weight)
        self.clip_and_step(optimizer)

        # The objective whose first-order gradient was applied: retain loss + λ_TR Σ_k w_k L_TR(θ_k).
        objective = losses["retain_loss"] + hp.tr_weight * diagnostics["tr_objective"]
        self.log_metrics(
            "train",
            {"loss": objective, **losses, **diagnostics},
            batch_size=batch[hp.retain_stream]["input_ids"].shape[0],
        )
        return losses["retain_loss"].detach()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        self.log_metrics("val", {"loss": loss}, batch_size=batch[self.hparams.retain_stream]["input_ids"].shape[0])
        return loss
