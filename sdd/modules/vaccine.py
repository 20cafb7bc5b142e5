"""Vaccine and T-Vaccine: alignment that is robust to perturbations of the hidden embeddings.

**Vaccine** — Huang, Hu and Liu (2024), "Vaccine: Perturbation-aware Alignment for Large Language
Models against Harmful Fine-tuning Attack" (arXiv:2402.01109; NeurIPS 2024), the min-max alignment
problem and Algorithm 1.
Alignment (harmful prompt -> refusal) is trained as a min-max problem over perturbations of every
layer's output embedding ``e_l``::

    min_w  max_{‖ε‖ <= ρ}  L( f_{w_L, ε_L} ∘ ... ∘ f_{w_1, ε_1}(x) ),
    f_{w_l, ε_l}(e_{l-1}) = f_{w_l}(e_{l-1}) + ε_l

solved, as in the paper, with one first-order step of the inner maximisation per batch:

1. a forward/backward pass of the alignment loss gives ``∇_{e_l} L`` for every layer l (the gradient
   with respect to the layer's output, through all later layers; no weight gradients are needed);
2. ``ε_l = ρ · ∇_{e_l} L / ‖∇_e L‖`` with the norm taken over all layers together (so ‖ε‖ = ρ);
3. a second forward pass adds ``ε_l`` to each layer's output through forward hooks (ε is a constant,
   and the perturbed output of layer l is the input of layer l+1); the gradient of this perturbed
   loss updates the weights, by the ordinary optimizer step.

**T-Vaccine** — Liu, Lin, Huang, Mo, Mu and Shen (2024), "Targeted Vaccine: Safety Alignment for
Large Language Models against Harmful Fine-Tuning via Layer-wise Perturbation" (arXiv:2410.09760),
Algorithm 1. The same two passes, on a subset of "safety-critical" layers only:

- every K = ``probability_every`` steps, the gradient of the loss on a *harmful* batch (harmful prompt
  -> harmful answer) with respect to every layer's output gives per-layer norms ``‖∇_{e_l} h‖``;
  layer l's selection probability is ``p_l = ‖∇_{e_l} h‖ / Σ_j ‖∇_{e_j} h‖``;
- every J = ``resample_every`` steps, ``num_layers`` layers are drawn from p without replacement;
- only those layers are perturbed (the norm of step 2 is taken over them), and with
  ``freeze_unselected`` the weights of the other decoder layers are frozen until the next draw
  (the paper's memory saving).

Interpretation and choices:
- ``target=layer`` (default) perturbs each decoder layer's output, the paper's ``e_l``.
  ``target=attention`` perturbs the output of each layer's self-attention block (before its
  residual addition), which is what both authors' implementations hook; it needs layers with a
  ``self_attn`` child (Llama, Mistral, Qwen, Gemma, Phi).
- Dropout masks differ between the two passes (as in the authors' code).
- The loss logged as ``train/loss`` is the perturbed loss whose gradient is applied;
  ``train/clean_loss`` is the first pass's unperturbed loss.
- T-Vaccine: the authors' code also activates layer i-1 of every drawn layer i for models deeper
  than 26 layers; that is not done here. Decoder layers outside the drawn set are frozen, other
  trainable weights (embeddings, head, under full fine-tuning) are not. T-Vaccine uses one harmful
  batch of the ``harmful`` stream for the probe (the authors: one example of a 200-example set).
- Papers' settings (Llama-2-7B, LoRA r=8, α=4 on all projections, AdamW lr 1e-3, weight decay 0.1,
  cosine schedule, warmup 0.1): Vaccine ρ = 2, batch 5 (later 10), 50 epochs over 5K alignment
  examples; T-Vaccine ρ = 3, 8 layers, J = 20, K = 200, 200 harmful probe examples, batch 10,
  20 epochs.
- Under DDP, T-Vaccine's changing set of trainable weights needs
  ``trainer.strategy=ddp_find_unused_parameters_true``. DeepSpeed is refused (the first pass's
  activation gradients are taken outside the engine).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from sdd.backbones import Backbone
from sdd.modules.ops import (
    decoder_layers,
    differentiable_embeddings,
    forward_hooks,
    global_norm,
    main_output,
    replace_main_output,
)
from sdd.modules.sft import SFTModule

TARGETS = ("layer", "attention")


# ---------------------------------------------------------------------------------------- Vaccine
class VaccineModule(SFTModule):
    """Perturbation-aware alignment on ``{"alignment": batch}`` steps (Vaccine).

    Args:
        rho: ρ, the norm of the perturbation of all perturbed layers' outputs together.
        target: ``layer`` (decoder-layer outputs, the paper's e_l) or ``attention`` (self-attention
            outputs, the authors' code).
        alignment_stream: the stream of harmful prompt -> refusal pairs.
        Others as :class:`SFTModule`.
    """

    supports_deepspeed = False  # the first pass takes activation gradients outside the engine
    streams = ("alignment",)
    data_config = "vaccine"

    def __init__(
        self,
        backbone: Backbone,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        rho: float = 2.0,
        target: str = "layer",
        alignment_stream: str = "alignment",
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, optimizer, scheduler, **kwargs)
        if rho < 0:
            raise ValueError(f"module.rho must be >= 0 (the perturbation's norm), got {rho}.")
        if target not in TARGETS:
            raise ValueError(f"module.target must be one of {TARGETS}, got '{target}'.")
        self._perturbation_handles: list = []
        self.last_perturbation: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ where perturbations go
    def perturbation_sites(self) -> dict[int, torch.nn.Module]:
        """Layer index -> the module whose output is perturbed, for every layer."""
        layers = decoder_layers(self.model)
        if self.hparams.target == "layer":
            return dict(enumerate(layers))
        missing = [i for i, layer in enumerate(layers) if not hasattr(layer, "self_attn")]
        if missing:
            raise ValueError(
                f"module.target=attention needs a self_attn block in every layer "
                f"({type(layers[0]).__name__} has none): use module.target=layer."
            )
        return {i: layer.self_attn for i, layer in enumerate(layers)}

    def active_layers(self, batch: dict[str, Any]) -> list[int]:
        """The layers perturbed at this step: all of them (T-Vaccine draws a subset)."""
        return sorted(self.perturbation_sites())

    # ------------------------------------------------------------------ the two passes
    def output_gradients(
        self, batch: dict[str, torch.Tensor], layers: Sequence[int]
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The cross-entropy of ``batch`` and its gradient with respect to the outputs of ``layers``.

        No weight gradient is computed or accumulated.
        """
        sites = self.perturbation_sites()
        captured: dict[int, torch.Tensor] = {}

        def capture(i: int):
            def hook(module, args, output):
                captured.setdefault(i, main_output(output))  # first call only (not a checkpoint recompute)

            return hook

        with differentiable_embeddings(self.model), forward_hooks({i: sites[i] for i in layers}, capture):
            loss = self.cross_entropy(batch)
        grads = torch.autograd.grad(loss, [captured[i] for i in layers], allow_unused=True)
        return loss.detach(), {
            i: (g if g is not None else torch.zeros_like(captured[i])).detach() for i, g in zip(layers, grads)
        }

    def perturbations(self, gradients: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """ε_l = ρ ∇_{e_l} L / ‖∇_e L‖ (global norm over the given layers)."""
        norm = global_norm(list(gradients.values()))
        scale = self.hparams.rho / (norm + 1e-7)
        return {i: (g.float() * scale).to(g.dtype) for i, g in gradients.items()}

    def add_perturbations(self, perturbations: Mapping[int, torch.Tensor]) -> None:
        """Register forward hooks adding ε_l to the outputs; they stay until :meth:`remove_perturbations`
        (after the backward pass, so gradient checkpointing recomputes the perturbed outputs)."""
        self.remove_perturbations()
        sites = self.perturbation_sites()

        def perturb(i: int):
            def hook(module, args, output):
                hidden = main_output(output)
                return replace_main_output(output, hidden + perturbations[i].to(hidden.dtype))

            return hook

        self._perturbation_handles = [sites[i].register_forward_hook(perturb(i)) for i in perturbations]

    def remove_perturbations(self) -> None:
        for handle in self._perturbation_handles:
            handle.remove()
        self._perturbation_handles = []

    def perturbed_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Both passes: the clean loss, ε, and the perturbed loss (hooks left in place for backward)."""
        layers = self.active_layers(batch)
        clean_loss, gradients = self.output_gradients(batch[self.hparams.alignment_stream], layers)
        perturbations = self.perturbations(gradients)
        self.last_perturbation = perturbations
        self.add_perturbations(perturbations)
        loss = self.cross_entropy(batch[self.hparams.alignment_stream])
        return {"loss": loss, "clean_loss": clean_loss, "hidden_grad_norm": global_norm(list(gradients.values()))}

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """The unperturbed alignment loss (validation)."""
        return self.cross_entropy(batch[self.hparams.alignment_stream])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.perturbed_loss(batch)
        self.log_metrics("train", out, batch_size=batch[self.hparams.alignment_stream]["input_ids"].shape[0])
        return out["loss"]

    def on_after_backward(self) -> None:
        self.remove_perturbations()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.remove_perturbations()  # also when no backward ran (e.g. a skipped step)
        super().on_train_batch_end(outputs, batch, batch_idx)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        self.log_metrics("val", {"loss": loss}, batch_size=batch[self.hparams.alignment_stream]["input_ids"].shape[0])
        return loss


# -------------------------------------------------------------------------------------- T-Vaccine
class TVaccineModule(VaccineModule):
    """Vaccine on layers drawn by their harmful-gradient norm (T-Vaccine), on ``{"alignment", "harmful"}`` steps.

    Args:
        num_layers: how many layers are perturbed (and trained) at a time.
        resample_every: J, steps between two draws of the layers.
        probability_every: K, steps between two refreshes of the layer probabilities.
        freeze_unselected: freeze the weights of the decoder layers that were not drawn.
        harmful_stream: the stream of harmful prompt -> harmful answer pairs (the probe).
        seed: the layer draws.
        Others as :class:`VaccineModule`.
    """

    streams = ("alignment", "harmful")
    data_config = "t_vaccine"

    def __init__(
        self,
        backbone: Backbone,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        rho: float = 3.0,
        num_layers: int = 8,
        resample_every: int = 20,
        probability_every: int = 200,
        freeze_unselected: bool = True,
        harmful_stream: str = "harmful",
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, optimizer, scheduler, rho=rho, **kwargs)
        if num_layers < 1 or resample_every < 1 or probability_every < 1:
            raise ValueError("module.num_layers, resample_every and probability_every must be >= 1.")
        self.layer_probabilities: torch.Tensor | None = None
        self.selected_layers: list[int] | None = None
        self._generator = torch.Generator().manual_seed(seed)
        self._layer_trainable: dict[int, list[tuple[torch.nn.Parameter, bool]]] | None = None
        self._probed_at = self._drawn_at = -1

    def probe_probabilities(self, harmful: dict[str, torch.Tensor]) -> torch.Tensor:
        """p_l = ‖∇_{e_l} h‖ / Σ_j ‖∇_{e_j} h‖ on a harmful batch, over all layers."""
        layers = sorted(self.perturbation_sites())
        _, gradients = self.output_gradients(harmful, layers)
        norms = torch.stack([torch.linalg.vector_norm(gradients[i].float()) for i in layers]).cpu()
        total = norms.sum()
        return norms / total if total > 0 else torch.full_like(norms, 1.0 / len(norms))

    def draw_layers(self, probabilities: torch.Tensor) -> list[int]:
        """``num_layers`` layer indices drawn from ``probabilities`` without replacement."""
        count = len(probabilities)
        if self.hparams.num_layers >= count:
            return list(range(count))
        # A layer with zero gradient norm may still be drawn when too few others remain.
        weights = probabilities.double().clamp(min=1e-12)
        return sorted(
            torch.multinomial(weights, self.hparams.num_layers, replacement=False, generator=self._generator).tolist()
        )

    def freeze_to(self, selected: Sequence[int]) -> None:
        """Only the drawn layers' (initially trainable) weights train until the next draw."""
        layers = decoder_layers(self.model)
        if self._layer_trainable is None:
            self._layer_trainable = {
                i: [(p, p.requires_grad) for p in layer.parameters()] for i, layer in enumerate(layers)
            }
        chosen = set(selected)
        for i, params in self._layer_trainable.items():
            for p, trainable in params:
                p.requires_grad_(trainable and i in chosen)

    def active_layers(self, batch: dict[str, Any]) -> list[int]:
        hp = self.hparams
        step = self.global_step if self._trainer is not None else 0
        # Once per optimizer step (not per accumulated micro-batch), and after a resume.
        if self.layer_probabilities is None or (step % hp.probability_every == 0 and step != self._probed_at):
            self._probed_at = step
            self.layer_probabilities = self.probe_probabilities(batch[hp.harmful_stream])
            if self._trainer is not None:
                probabilities = dict(enumerate(self.layer_probabilities.tolist()))
                self.log_metrics(
                    "train", {f"layer_probability/{i}": p for i, p in probabilities.items()}, 1, learning_rate=False
                )
        if self.selected_layers is None or (step % hp.resample_every == 0 and step != self._drawn_at):
            self._drawn_at = step
            self.selected_layers = self.draw_layers(self.layer_probabilities)
            if hp.freeze_unselected:
                self.freeze_to(self.selected_layers)
        return self.selected_layers

    def on_train_end(self) -> None:
        if self._layer_trainable is not None:  # give the saved model back its trainable flags
            for params in self._layer_trainable.values():
                for p, trainable in params:
                    p.requires_grad_(trainable)
