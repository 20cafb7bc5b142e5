"""RepNoise: push the representations of harmful text towards Gaussian noise, across all layers.

Rosati, Wehner, Williams, Bartoszcze, Atanasov, Gonzales, Majumdar, Maple, Sajjad and Rudzicz (2024),
"Representation Noising: A Defence Mechanism Against Harmful Finetuning" (arXiv:2405.14577;
NeurIPS 2024), the RepNoise objective::

    L(θ) = ℓ_stability(θ; D_harmless)  -  α · ℓ_ascent(θ; D_harmful)
           +  β · mean_l MMD( Z_l(D_harmful), N(0, I) )

- stability: cross-entropy of the harmless answers (refusals to the same harmful prompts in the
  paper; the ``alignment`` stream here);
- ascent: the harmful answers' cross-entropy, taken at every layer through the model's own final
  norm and output head (logit lens), averaged over layers, and bounded as in the authors' code:
  ``-α · log(1 + mean_l CE_l)``, so the ascent slows down as the loss grows;
- noise: the maximum mean discrepancy between the harmful batch's representations at each layer
  and samples of N(0, I) of the same shape (zero on non-answer positions in both), averaged over
  layers, with a sum of 5 Gaussian kernels of bandwidths ``σ·2^k, k = -2..2`` where σ is the mean
  pairwise squared distance of the pooled samples (not differentiated), as in the authors' code.

Interpretation and choices:
- Representations are the outputs of each layer's MLP block (``representation=mlp``, the authors'
  code) or of the whole decoder layer (``representation=layer``, the residual stream). One sample
  of the MMD is one example: its ``[seq, hidden]`` states, zeroed off the answer tokens, flattened
  (the authors' choice), so the MMD compares ``batch`` points with ``batch`` noise draws.
- The answer tokens are those with a label (the authors mark the positions where the harmful and
  harmless token ids differ, i.e. the answers of a paired example).
- Logit lens: the embedding output and the outputs of layers 1..L-1 go through the final norm and
  the head, and the model's own logits stand for layer L: the mean of these L+1 cross-entropies
  (the authors add the final logits' CE once more, and divide the L+2 terms by L+1). With
  ``logit_lens=false`` only the final logits are used.
- Paper settings (Llama-2-7B-chat, full fine-tuning): α = 1, β = 0.001, AdamW lr 2e-5, batch 8,
  1 epoch over 10K paired BeaverTails examples.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from sdd.backbones import Backbone
from sdd.chat import IGNORE_INDEX
from sdd.modules.ops import decoder_layers, forward_hooks, logit_lens_cross_entropy, main_output, model_cross_entropy
from sdd.modules.sft import SFTModule

REPRESENTATIONS = ("mlp", "layer")


def gaussian_mmd(x: torch.Tensor, y: torch.Tensor, kernel_mul: float = 2.0, kernel_num: int = 5) -> torch.Tensor:
    """Biased MMD² estimate between samples ``x`` ``[n, d]`` and ``y`` ``[m, d]`` with a multi-bandwidth RBF kernel.

    ``k(a, b) = Σ_k exp(-‖a - b‖² / (σ · kernel_mul^(k - kernel_num // 2)))``, σ the mean squared distance
    between distinct pooled samples (a constant for the gradient).
    """
    total = torch.cat([x, y]).float()
    squares = (total * total).sum(-1)
    distances = (squares[:, None] + squares[None, :] - 2.0 * total @ total.T).clamp(min=0.0)
    count = total.shape[0]
    bandwidth = (distances.detach().sum() / max(count * count - count, 1)).clamp(min=1e-12)
    bandwidth = bandwidth / kernel_mul ** (kernel_num // 2)
    kernel = sum(torch.exp(-distances / (bandwidth * kernel_mul**k)) for k in range(kernel_num))
    n = x.shape[0]
    return kernel[:n, :n].mean() + kernel[n:, n:].mean() - kernel[:n, n:].mean() - kernel[n:, :n].mean()


class RepNoiseModule(SFTModule):
    """Representation Noising on ``{"harmful": batch, "alignment": batch}`` steps.

    Args:
        alpha: α, weight of the bounded gradient-ascent term.
        beta: β, weight of the noise (MMD) term.
        representation: ``mlp`` (each layer's MLP output) or ``layer`` (each decoder layer's output).
        logit_lens: take the ascent cross-entropy at every layer (true) or at the output only.
        kernel_mul, kernel_num: the MMD kernel's bandwidth ratio and number of bandwidths.
        harmful_stream, retain_stream: harmful prompt -> harmful answer; the harmless (retain) pairs.
        Others as :class:`SFTModule`.
    """

    streams = ("harmful", "retain")
    data_config = "repnoise"

    def __init__(
        self,
        backbone: Backbone,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        alpha: float = 1.0,
        beta: float = 0.001,
        representation: str = "mlp",
        logit_lens: bool = True,
        kernel_mul: float = 2.0,
        kernel_num: int = 5,
        harmful_stream: str = "harmful",
        retain_stream: str = "alignment",
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, optimizer, scheduler, **kwargs)
        if representation not in REPRESENTATIONS:
            raise ValueError(f"module.representation must be one of {REPRESENTATIONS}, got '{representation}'.")
        if alpha < 0 or beta < 0:
            raise ValueError(f"module.alpha and module.beta must be >= 0, got alpha={alpha}, beta={beta}.")

    def representation_sites(self) -> dict[int, torch.nn.Module]:
        layers = decoder_layers(self.model)
        if self.hparams.representation == "layer":
            return dict(enumerate(layers))
        if not all(hasattr(layer, "mlp") for layer in layers):
            raise ValueError(f"{type(layers[0]).__name__} has no mlp block: use module.representation=layer.")
        return {i: layer.mlp for i, layer in enumerate(layers)}

    def noise_loss(self, representations: Sequence[torch.Tensor], answer_mask: torch.Tensor) -> torch.Tensor:
        """Mean over layers of MMD(masked representations, masked N(0, I) draws), one sample per example."""
        hp = self.hparams
        mask = answer_mask.unsqueeze(-1)
        losses = []
        for hidden in representations:
            masked = hidden * mask.to(hidden.dtype)
            noise = torch.randn_like(masked) * mask.to(hidden.dtype)
            losses.append(gaussian_mmd(masked.flatten(1), noise.flatten(1), hp.kernel_mul, hp.kernel_num))
        return torch.stack(losses).mean()

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        hp = self.hparams
        harmful = batch[hp.harmful_stream]
        sites = self.representation_sites()
        captured: dict[int, torch.Tensor] = {}

        def capture(i: int):
            def hook(module, args, output):
                captured.setdefault(i, main_output(output))

            return hook

        with forward_hooks(sites, capture):
            harmful_ce, output = model_cross_entropy(self.model, harmful, output_hidden_states=hp.logit_lens)
        ascent = logit_lens_cross_entropy(self.model, output, harmful["labels"])[0] if hp.logit_lens else harmful_ce
        noise = self.noise_loss([captured[i] for i in sorted(captured)], harmful["labels"] != IGNORE_INDEX)
        retain = self.cross_entropy(batch[hp.retain_stream])
        loss = retain - hp.alpha * torch.log1p(ascent) + hp.beta * noise
        return {
            "loss": loss,
            "retain_loss": retain,
            "harmful_ascent_ce": ascent,
            "harmful_ce": harmful_ce,
            "noise_mmd": noise,
        }

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.losses(batch)["loss"]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.losses(batch)
        self.log_metrics("train", losses, batch_size=batch[self.hparams.retain_stream]["input_ids"].shape[0])
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.losses(batch)["retain_loss"]
        self.log_metrics("val", {"loss": loss}, batch_size=batch[self.hparams.retain_stream]["input_ids"].shape[0])
        return loss
