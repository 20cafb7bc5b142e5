"""Operations on causal LMs shared by every defense and attack: the one place for each of them.

- answer-token losses: :func:`answer_logprobs`, :func:`masked_mean`, :func:`answer_cross_entropy`
  (tensors; defined in :mod:`sdd.losses`, which evaluation code imports) and :func:`model_cross_entropy`
  (a forward pass of a batch);
- the logit lens: :func:`final_norm` and :func:`logit_lens_cross_entropy` (SEAM, RepNoise);
- decoder blocks: :func:`decoder_layers`, :func:`forward_hooks`, :func:`main_output`,
  :func:`replace_main_output`, :func:`differentiable_embeddings` (Vaccine, RepNoise, refusal ablation);
- weights: :func:`trainable_parameters`, :func:`restored` (perturb, then restore bit for bit: SEAM,
  Booster, TAR) and :func:`global_norm`.

Every function accepts a plain ``transformers`` model or one wrapped by ``peft``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from sdd.chat import IGNORE_INDEX
from sdd.errors import ConfigError
from sdd.losses import answer_cross_entropy, answer_logprobs, masked_mean, upcast

__all__ = [
    "answer_logprobs",
    "masked_mean",
    "answer_cross_entropy",
    "upcast",
    "model_cross_entropy",
    "base_model",
    "final_norm",
    "logit_lens_cross_entropy",
    "decoder_layers",
    "main_output",
    "replace_main_output",
    "forward_hooks",
    "differentiable_embeddings",
    "trainable_parameters",
    "restored",
    "global_norm",
]

FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_layer_norm")
LAYER_COUNT_NAMES = ("num_hidden_layers", "num_layers", "n_layer")


# ---------------------------------------------------------------------------------------- losses
def model_cross_entropy(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], **forward_kwargs: Any
) -> tuple[torch.Tensor, Any]:
    """``(CE, output)``: the token-mean cross-entropy of a batch's answer tokens, and the model's output.

    Computed here rather than by ``transformers`` (whose loss casts logits to float32), so a float64
    model keeps float64 (finite-difference checks).

    Args:
        model: a causal LM.
        batch: ``input_ids``, ``attention_mask`` and ``labels`` (``IGNORE_INDEX`` off the answers).
        **forward_kwargs: passed to the model (e.g. ``output_hidden_states=True``).
    """
    output = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, **forward_kwargs
    )
    return answer_cross_entropy(output.logits, batch["labels"]), output


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The ``transformers`` model under a ``peft`` wrapper (the model itself if it has none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ---------------------------------------------------------------------------------------- logit lens
def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The normalisation applied before the output head (Llama ``norm``, Phi ``final_layernorm`` ...).

    Raises:
        ConfigError: the model has none of the known names.
    """
    base = base_model(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    for owner in (decoder, getattr(decoder, "encoder", None), base):
        for name in FINAL_NORM_NAMES:
            module = getattr(owner, name, None) if owner is not None else None
            if isinstance(module, torch.nn.Module):
                return module
    raise ConfigError(
        f"No final norm found in {type(base).__name__} (looked for {FINAL_NORM_NAMES}): the logit "
        "lens needs one; switch the defense's layer-wise loss off (see its module config)."
    )


def logit_lens_cross_entropy(
    model: torch.nn.Module, output: Any, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean over exits, final CE)``: the answer tokens' cross-entropy read out at every layer.

    The exits are the embedding output and the outputs of layers 1..L-1, each through the final norm
    and the output head (the logit lens), and the model's own logits for layer L: L+1 terms.

    Args:
        model: the causal LM that produced ``output``.
        output: its output of a forward pass with ``output_hidden_states=True``.
        labels: the batch's labels.
    """
    final = answer_cross_entropy(output.logits, labels)
    targets = labels[:, 1:]
    answer = targets != IGNORE_INDEX
    if not answer.any():
        return final, final
    norm, head = final_norm(model), model.get_output_embeddings()
    # hidden_states[-1] is already normalised and gives output.logits: its read-out is `final`.
    exits = [
        F.cross_entropy(upcast(head(norm(hidden[:, :-1][answer]))), targets[answer])
        for hidden in output.hidden_states[:-1]
    ]
    return torch.stack([*exits, final]).mean(), final


# ---------------------------------------------------------------------------------------- decoder blocks
def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks of a causal LM, in order (plain or wrapped by ``peft``).

    The public lookup of the decoder layers: hooks on their outputs read or edit the residual stream
    (Vaccine's perturbations, RepNoise's representations, refusal-direction ablation).

    Args:
        model: a causal LM whose config names its layer count (``num_hidden_layers``, ``num_layers`` or
            ``n_layer``) and which holds its blocks in one ``ModuleList`` of that length.

    Raises:
        ConfigError: no such ``ModuleList``.
    """
    base = base_model(model)
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    count = next((getattr(config, k) for k in LAYER_COUNT_NAMES if hasattr(config, k)), None)
    for module in base.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise ConfigError(
        f"Cannot find the {count} decoder layers of {type(base).__name__} (no ModuleList of that length); "
        "this method needs a transformer whose blocks are held in one ModuleList."
    )


def main_output(output: Any) -> torch.Tensor:
    """The hidden states of a block's output (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def replace_main_output(output: Any, hidden: torch.Tensor) -> Any:
    """A block's output with its hidden states replaced by ``hidden`` (what a forward hook returns)."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextlib.contextmanager
def forward_hooks(modules: Mapping[int, torch.nn.Module], make_hook: Callable[[int], Callable]) -> Iterator[list]:
    """Register ``make_hook(i)`` as a forward hook of each ``modules[i]``; removed on exit."""
    handles = [module.register_forward_hook(make_hook(i)) for i, module in modules.items()]
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def differentiable_embeddings(model: torch.nn.Module) -> Iterator[None]:
    """Make the input embeddings require grad, so hidden-state gradients exist even when the
    embedding layer and the lowest blocks are frozen (LoRA, T-Vaccine)."""

    def hook(module, args, output):
        return output if output.requires_grad else output.detach().requires_grad_(True)

    handle = model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------- weights
def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that require a gradient (the LoRA adapters under ``peft``), in module order."""
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def restored(params: Sequence[torch.Tensor], device: torch.device | str | None = None) -> Iterator[Callable[[], None]]:
    """Perturb-then-restore: ``params`` get their current values back, bit for bit, on exit (also on error).

    Args:
        params: the tensors a block edits in place.
        device: where the saved copy is kept (None: each tensor's own device; ``cpu`` saves accelerator
            memory).

    Yields:
        ``reset()``, which restores the saved values right away (for several perturbations in one block).
    """
    saved = [p.detach().to(device or p.device, copy=True) for p in params]

    def reset() -> None:
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)

    try:
        yield reset
    finally:
        reset()


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """‖(t_1, ..., t_n)‖_2 over several tensors together, in float32."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors]))
