"""SEAM: a self-destructive language model, trained so that harmful fine-tuning ruins its utility.

Wang, Zhu and Wang (2025), "Self-Destructive Language Model" (arXiv:2505.12186; ICLR 2026; code
github.com/ZJUWYH/seam). Each step minimises (Eq. of the overall objective)::

    L(θ) = β · L_sd(θ)  +  w_ul · L_ul(θ)  +  α · L_up(θ)

- ``L_sd = sim(g_a, g_b) = g_aᵀ g_b / (‖g_a‖ ‖g_b‖)``, the cosine of ``g_a = ∇_θ CE(harmful batch)``
  (an attacker's fine-tuning gradient) and ``g_b = ∇_θ CE(benign batch)``. Pushing it to -1 makes
  harmful fine-tuning a step of gradient *ascent* on benign data: the model self-destructs.
- ``L_ul``: unlearning (adversarial gradient ascent) on harmful data, which lengthens the path an
  attacker must travel to recover harmfulness.
- ``L_up = CE(alignment batch)``: utility preservation on harmful prompts with refusals.

The gradient of ``L_sd`` needs Hessian-vector products. SEAM estimates it Hessian-free, by finite
differences of gradients (the paper's estimate, with an O(ε) error bound)::

    ∇L̂_sd = (1/ε) · [ (g_b(θ + ε(ḡ_a - c ḡ_b)) - g_b(θ)) / ‖g_b‖
                     + (g_a(θ + ε(ḡ_b - c ḡ_a)) - g_a(θ)) / ‖g_a‖ ],   ḡ = g/‖g‖,  c = ḡ_aᵀ ḡ_b

since ``∇ sim = H_b(ḡ_a - c ḡ_b)/‖g_b‖ + H_a(ḡ_b - c ḡ_a)/‖g_a‖`` and ``H v ≈ (g(θ + εv) - g(θ))/ε``.
A step costs six forward/backward passes (unlearning, utility, g_a, g_b and the two perturbed
gradients) against one for plain SFT.

Interpretation and choices:
- ``unlearn_loss``: the paper writes ``L_ul = -E ℓ(f_θ(x), y)``, which is unbounded below. The
  authors' code (adapted from RepNoise) instead minimises ``-log(1 + CE)`` with CE averaged over
  every layer's exit (a "logit lens": each hidden state through the final norm and the LM head):
  its gradient is ``∇CE / (1 + CE)``, which fades as the harmful answers become unlikely. That is
  the default here (``unlearn_loss=neg_log1p_ce``, ``unlearn_all_layers=true``: the embedding
  output and layers 1..L-1 through the lens, plus the model's own logits, L+1 terms in all);
  ``unlearn_loss=neg_ce`` is the paper's literal ``-CE`` and ``unlearn_all_layers=false`` uses the
  final logits only.
- Loss masking: every cross-entropy is over answer tokens only (this project's data path). The
  authors mask the harmful answer by its difference from the paired refusal and take the benign
  CE over whole sequences.
- The similarity weight is β (0.01); the authors apply ``β/ε`` to the bracket above, the same
  thing. α = 1 weighs the refusal CE; the unlearning term has weight ``unlearn_weight`` = 1.
- Streams: ``harmful_stream`` feeds g_a, ``benign_stream`` feeds g_b, ``unlearn_stream`` (default
  the harmful one) feeds L_ul and ``alignment_stream`` feeds L_up; data=seam provides
  ``harmful`` (harmful QA), ``benign`` and ``alignment`` (refusals).
- Dropout: the unperturbed and the perturbed gradient of each stream are taken with the same
  random state (same dropout masks), so their difference is curvature, not dropout noise.
- Only trainable parameters are perturbed (LoRA adapters under ``module.lora``); they are restored
  bit-exactly from a saved copy, also when a pass fails.
- Published defaults: AdamW, lr 2e-5, cosine schedule, warmup 0.1, 8,000 examples, 256 tokens,
  α = 1, β = 0.01, ε = 1e-3, no gradient clipping; the authors' batch 4 and one epoch (2,000 steps).
  ``defense=seam`` sets them; ``scale=paper`` keeps them (train.py's default ``scale=cpu_demo``
  replaces the sizes and length with the embedded CPU ones).
- Precision: ε-perturbations of unit directions are far below half-precision resolution; keep
  the trainable weights in float32 (``backbone.dtype=float32``, ``trainer.precision=bf16-mixed``).
  fp16 loss scaling is refused (the similarity gradient is computed unscaled).
- Memory: besides the weights, their gradients and optimizer state, a step holds g_a, g_b, a copy
  of θ and one perturbed gradient (``offload_buffers=true`` keeps the first three on the CPU).
  DeepSpeed ZeRO is not supported (whole gradients and weights are read and edited); under DDP
  the similarity gradient is averaged across ranks.

Where this differs from the authors' setup (``experiment=seam_grid``, ``defense=seam scale=paper``):
- Alignment data: refusals to the same harmful prompts as the harmful stream, where the corpus has
  such pairs (``corpus.paired_harmful_qa`` / ``corpus.paired_refusals``, read by ``data=seam``): on
  ``corpus=local`` BeaverTails' prompt -> unsafe / prompt -> safe pairs; on ``corpus=hub`` PKU-SafeRLHF
  pairs (one response safe, one unsafe; Hub BeaverTails rows are single responses and cannot be
  paired), so the harmful stream is PKU-SafeRLHF's rather than BeaverTails'. A corpus without paired
  sources falls back to ``corpus.harmful_qa`` and ``corpus.refusals`` (unpaired prompts).
- Loss masking: answer tokens only for every stream (see above), not the authors' refusal-difference
  mask on harmful answers and whole-sequence benign CE.
- Not stated by the authors, our choices: AdamW weight decay 0 for the defense; 512 attack tokens;
  the PEFT attacks' LoRA adapters (r 8, alpha 16, dropout 0.05, every linear layer; attack/*_lora.yaml).
- Attacks (``seam_grid``): the authors' recipe (one epoch, batch 4, cosine with 10% warmup, weight
  decay 0.01, no clipping) for all 11 attacks, SGD included; the attack data are BeaverTails harmful
  QA (``corpus.harmful_qa``).
- Evaluation: zero-shot MMLU, TruthfulQA MC1, ARC-Easy and HellaSwag through lm-evaluation-harness's
  stock tasks (the authors' harness version and splits are not known); harmfulness by this project's
  judges (the rubric judge in ``seam_grid``), which need not match the authors' HS (a percentage of
  harmful answers). The fine-tuning scores (SST2, AGNEWS, GSM8K, AlpacaEval after benign
  fine-tuning) are not reproduced.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch

from sdd.backbones import Backbone
from sdd.modules.common import ManualStepMixin
from sdd.modules.ops import logit_lens_cross_entropy, model_cross_entropy, restored
from sdd.modules.sft import SFTModule

log = logging.getLogger(__name__)

UNLEARN_LOSSES = ("neg_log1p_ce", "neg_ce")

# Lightning warns that manual-optimization checkpoints hold the weights after the step: that is the
# state consistent with the saved global step, which resuming needs.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)

Gradients = list[torch.Tensor]


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inner product of two parameter-shaped gradient lists, accumulated in at least float32."""
    total = None
    for x, y in zip(a, b):
        dtype = torch.promote_types(x.dtype, torch.float32)
        term = torch.dot(x.reshape(-1).to(dtype), y.reshape(-1).to(x.device, dtype))
        total = term if total is None else total + term.to(total.device)
    return total.cpu() if total is not None else torch.tensor(0.0)


@contextlib.contextmanager
def replayed_randomness(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block with the global RNG seeded to ``seed``, restoring the outer state afterwards.

    Two blocks with the same seed draw the same dropout masks.
    """
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class SEAMModule(ManualStepMixin, SFTModule):
    """SEAM on ``{harmful, benign, alignment}`` steps (manual optimization).

    Args:
        alpha: α, weight of the utility (refusal) cross-entropy L_up.
        beta: β, weight of the gradient-similarity term L_sd.
        epsilon: ε, the finite-difference step of the Hessian-free estimate.
        unlearn_weight: weight of the unlearning loss L_ul (0: off).
        unlearn_loss: ``neg_log1p_ce`` (-log(1 + CE), the authors' code) or ``neg_ce`` (-CE, the
            paper's formula, unbounded below).
        unlearn_all_layers: average the CE of L_ul over every layer's logit-lens exit (authors'
            code) instead of the final logits only.
        harmful_stream: the stream of g_a (an attacker's harmful fine-tuning data).
        benign_stream: the stream of g_b (benign instruction data).
        alignment_stream: the stream of L_up (harmful prompts with refusals).
        unlearn_stream: the stream of L_ul; null: ``harmful_stream``.
        offload_buffers: keep g_a, g_b and the saved weights on the CPU (less accelerator memory,
            more transfers).
        Others as :class:`SFTModule`.
    """

    supports_deepspeed = False  # reads whole gradients and perturbs whole weights
    streams = ("harmful", "benign", "alignment", "unlearn")
    data_config = "seam"

    def __init__(
        self,
        backbone: Backbone,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        alpha: float = 1.0,
        beta: float = 0.01,
        epsilon: float = 1e-3,
        unlearn_weight: float = 1.0,
        unlearn_loss: str = "neg_log1p_ce",
        unlearn_all_layers: bool = True,
        harmful_stream: str = "harmful",
        benign_stream: str = "benign",
        alignment_stream: str = "alignment",
        unlearn_stream: str | None = None,
        offload_buffers: bool = False,
        **kwargs: Any,
    ) -> None:
        if unlearn_stream is None:
            unlearn_stream = harmful_stream
        super().__init__(backbone, optimizer, scheduler, **kwargs)
        if unlearn_loss not in UNLEARN_LOSSES:
            raise ValueError(f"module.unlearn_loss must be one of {UNLEARN_LOSSES}, got '{unlearn_loss}'.")
        if epsilon <= 0:
            raise ValueError(f"module.epsilon must be > 0 (the finite-difference step; SEAM uses 1e-3), got {epsilon}.")
        if min(alpha, beta, unlearn_weight) < 0:
            raise ValueError(
                "module.alpha, module.beta and module.unlearn_weight must be >= 0 (0 switches a term off)."
            )
        self.automatic_optimization = False

    # ------------------------------------------------------------------ setup and checks
    def required_streams(self) -> dict[str, str]:
        """Role -> stream name, for every stream a step reads (a term with weight 0 reads none)."""
        hp = self.hparams
        roles = super().required_streams()
        if hp.alpha == 0:
            roles.pop("alignment")
        if hp.unlearn_weight == 0:
            roles.pop("unlearn")
        return roles

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self._trainer is not None and str(self.trainer.precision).startswith("16"):
            raise ValueError("SEAM does not support fp16 loss scaling: use trainer.precision=bf16-mixed or 32-true.")

    def on_fit_start(self) -> None:
        low = {p.dtype for p in self.trainable_parameters() if p.dtype in (torch.float16, torch.bfloat16)}
        if low:
            log.warning(
                "SEAM perturbs %s weights by ε=%g along unit directions, mostly below their resolution: the "
                "finite-difference estimate degrades. Load the weights in float32 (backbone.dtype=float32) and "
                "train with trainer.precision=bf16-mixed.",
                sorted(map(str, low)),
                self.hparams.epsilon,
            )

    # ------------------------------------------------------------------ losses
    def unlearning_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L_ul, CE)``: the unlearning loss on a harmful batch and the cross-entropy it is made of."""
        hp = self.hparams
        ce, output = model_cross_entropy(self.model, batch, output_hidden_states=hp.unlearn_all_layers)
        if hp.unlearn_all_layers:
            ce, _ = logit_lens_cross_entropy(self.model, output, batch["labels"])
        loss = -ce if hp.unlearn_loss == "neg_ce" else -torch.log1p(ce)
        return loss, ce

    # ------------------------------------------------------------------ the similarity gradient
    def stream_gradient(
        self, batch: dict[str, torch.Tensor], params: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, Gradients]:
        """``(CE, ∇_θ CE)`` on a batch, by ``autograd.grad`` (no DDP hooks, ``.grad`` untouched)."""
        loss = self.cross_entropy(batch)
        grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
        return loss.detach(), list(grads)

    def gradient_pair(
        self, harmful: dict[str, torch.Tensor], benign: dict[str, torch.Tensor]
    ) -> tuple[Gradients, Gradients, tuple[int, int], dict[str, float]]:
        """``(g_a, g_b, seeds, stats)`` at the current weights; stats hold their cosine, norms and CEs.

        Each gradient is taken under its own fresh seed (returned), so that it can be replayed.
        """
        params = self.trainable_parameters()
        seeds = tuple(int(s) for s in torch.randint(0, 2**62, (2,)))
        device = params[0].device
        with replayed_randomness(seeds[0], device):
            ce_a, g_a = self.stream_gradient(harmful, params)
        with replayed_randomness(seeds[1], device):
            ce_b, g_b = self.stream_gradient(benign, params)
        if self.hparams.offload_buffers:
            g_a, g_b = [g.cpu() for g in g_a], [g.cpu() for g in g_b]
        norm_a, norm_b = _dot(g_a, g_a).sqrt().item(), _dot(g_b, g_b).sqrt().item()
        # cos is undefined for a zero gradient (no answer token): 0, and the estimate is skipped.
        cosine = _dot(g_a, g_b).item() / (norm_a * norm_b) if norm_a > 0 and norm_b > 0 else 0.0
        stats = {
            "grad_cosine": cosine,
            "harmful_ce": ce_a.item(),
            "benign_ce": ce_b.item(),
            "grad_norm_harmful": norm_a,
            "grad_norm_benign": norm_b,
        }
        return g_a, g_b, seeds, stats

    def similarity_gradient(
        self,
        harmful: dict[str, torch.Tensor],
        benign: dict[str, torch.Tensor],
        scale: float = 1.0,
        out: Gradients | None = None,
    ) -> tuple[Gradients, dict[str, float]]:
        """Add ``scale`` times the Hessian-free estimate of ∇_θ cos(g_a, g_b) to ``out``.

        The trainable weights are perturbed twice in place and restored bit-exactly.

        Args:
            harmful, benign: the batches of g_a and g_b.
            scale: factor of the estimate (β in training).
            out: one tensor per trainable parameter to add into (new zero tensors if None).

        Returns:
            ``out`` and :meth:`gradient_pair`'s stats (``grad_cosine`` is c).
        """
        epsilon = self.hparams.epsilon
        params = self.trainable_parameters()
        if out is None:
            out = [torch.zeros_like(p) for p in params]
        g_a, g_b, (seed_a, seed_b), stats = self.gradient_pair(harmful, benign)
        cosine, norm_a, norm_b = stats["grad_cosine"], stats["grad_norm_harmful"], stats["grad_norm_benign"]
        if norm_a == 0 or norm_b == 0:
            log.warning(
                "A zero gradient (harmful %.3g, benign %.3g): the similarity term is skipped this step.", norm_a, norm_b
            )
            return out, stats

        device = params[0].device
        buffer = torch.device("cpu") if self.hparams.offload_buffers else None
        # (stream batch, its seed, its gradient and norm, the other gradient and norm)
        passes = ((benign, seed_b, g_b, norm_b, g_a, norm_a), (harmful, seed_a, g_a, norm_a, g_b, norm_b))
        with restored(params, buffer) as reset:
            for batch, seed, g_self, norm_self, g_other, norm_other in passes:
                with torch.no_grad():  # θ += ε (ḡ_other - c ḡ_self)
                    for p, mine, other in zip(params, g_self, g_other):
                        direction = other.to(p.device) / norm_other - mine.to(p.device) * (cosine / norm_self)
                        p.add_(direction.to(p.dtype), alpha=epsilon)
                with replayed_randomness(seed, device):
                    _, g_perturbed = self.stream_gradient(batch, params)
                reset()
                with torch.no_grad():
                    factor = scale / (epsilon * norm_self)
                    for acc, new, old in zip(out, g_perturbed, g_self):
                        acc.add_((new - old.to(new.device)).to(acc.dtype), alpha=factor)
                del g_perturbed
        return out, stats

    # ------------------------------------------------------------------ the step
    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """The utility cross-entropy on the alignment stream."""
        return self.cross_entropy(batch[self.hparams.alignment_stream])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        optimizer = self.optimizers()
        params = self.trainable_parameters()
        optimizer.zero_grad()

        losses: dict[str, torch.Tensor] = {}
        objective = None
        if hp.unlearn_weight > 0:
            losses["unlearn_loss"], losses["unlearn_ce"] = self.unlearning_loss(batch[hp.unlearn_stream])
            objective = hp.unlearn_weight * losses["unlearn_loss"]
        if hp.alpha > 0:
            losses["utility_loss"] = self.cross_entropy(batch[hp.alignment_stream])
            objective = hp.alpha * losses["utility_loss"] + (0 if objective is None else objective)
        if objective is not None:
            self.manual_backward(objective)

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        harmful, benign = batch[hp.harmful_stream], batch[hp.benign_stream]
        if self.trainer.world_size > 1 and hp.beta > 0:
            similarity, stats = self.similarity_gradient(harmful, benign)
            for p, g in zip(params, similarity):
                p.grad.add_(self.trainer.strategy.reduce(g, reduce_op="mean"), alpha=hp.beta)
        elif hp.beta > 0:
            _, stats = self.similarity_gradient(harmful, benign, scale=hp.beta, out=[p.grad for p in params])
        else:  # β = 0: only measure the cosine
            *_, stats = self.gradient_pair(harmful, benign)

        self.clip_and_step(optimizer)

        cosine = stats.pop("grad_cosine")
        total = hp.beta * cosine + (0.0 if objective is None else objective.item())
        metrics = {"loss": total, "grad_cosine": cosine, "similarity_loss": hp.beta * cosine, **losses, **stats}
        self.log_metrics("train", metrics, batch_size=harmful["input_ids"].shape[0], prog_bar=("loss", "grad_cosine"))
        return torch.tensor(total)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        for name, stream in batch.items():
            self.log_metrics("val", {f"{name}_ce": self.cross_entropy(stream)}, batch_size=stream["input_ids"].shape[0])
