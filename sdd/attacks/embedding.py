"""Embedding-space attack (evaluation-time): a continuous adversarial suffix optimised per prompt.

Schwinn et al. 2024, "Soft Prompt Threats: Attacking Safety Alignment and Unlearning in Open-Source LLMs
through the Embedding Space" (NeurIPS 2024): with the weights in hand, an attacker need not search over
tokens; it optimises the input embeddings of an adversarial suffix directly, toward an affirmative
target ("Sure, here is ..."), and then lets the model answer from those embeddings. They report that
this breaks the safety alignment of open models within few optimisation steps.

What we interpreted (our choices):

- The suffix is ``suffix_tokens`` embedding vectors right after the user's message, inside the chat
  template (the template's text around it is the shared chat path's, :mod:`sdd.chat`), initialised from
  the embeddings of the tokens of ``init`` (a fixed string, ``"!"`` by default, repeated to the length).
- The loss is the mean cross-entropy of the target's tokens after the generation prompt; the target is
  the prompt set's ``target`` column where present (and ``use_target_column``), else the fixed ``target``.
- ``optimizer: signed_gd`` moves every coordinate by ``step_size`` against the gradient's sign;
  ``adam`` uses Adam with learning rate ``step_size``. ``steps`` updates; each prompt keeps the suffix of
  its lowest loss seen (so the loss after is never above the loss before).
- Prompts are optimised together in padded batches (``batch_size``; each prompt's loss depends only on
  its own suffix), then answered greedily from the embeddings
  (:func:`sdd.generation.generate_token_ids_from_embeddings`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from sdd.chat import IGNORE_INDEX, instruction_answer, segment_conversation
from sdd.errors import ConfigError

TARGET_COLUMN = "target"
OPTIMIZERS = ("signed_gd", "adam")
_PLACEHOLDER = "[[adversarial suffix]]"  # where the suffix goes in the rendered text; never tokenized


@dataclass
class SuffixLayout:
    """Token ids around the suffix: ``before`` + suffix + ``after`` is the prompt (generation prompt
    included); ``target`` follows it in the assistant turn."""

    before: list[int]
    after: list[int]
    target: list[int]


def suffix_layout(
    tokenizer, prompt: str, target: str, system_prompt: str | None = None, stop_ids: Sequence[int] = ()
) -> SuffixLayout:
    """Cut the rendered exchange (``prompt`` + suffix -> ``target``) around the suffix; each piece is tokenized
    on its own."""
    segments = segment_conversation(tokenizer, instruction_answer(f"{prompt} {_PLACEHOLDER}", target, system_prompt))
    prompt_text = "".join(text for text, trainable in segments if not trainable)
    at = prompt_text.rfind(_PLACEHOLDER)
    if at < 0:
        raise ConfigError(
            "The chat template drops the user's message, so no suffix can follow it; fix backbone.chat_template."
        )

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    target_ids = ids(segments[-1][0])
    stops = set(stop_ids)
    end = next((i for i, token in enumerate(target_ids) if token in stops), len(target_ids))
    # The space between prompt and suffix is left out: the first suffix vector takes its place.
    before, after = ids(prompt_text[:at].removesuffix(" ")), ids(prompt_text[at + len(_PLACEHOLDER) :])
    if not target_ids[:end]:
        raise ConfigError("The embedding attack's target renders to no token; set eval_attacks.<label>.target.")
    return SuffixLayout(before, after, target_ids[:end])


def target_losses(model, embed, layouts: Sequence[SuffixLayout], suffixes: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each layout's target tokens given its prompt with ``suffixes[i]`` (differentiable).

    Args:
        model: the causal LM.
        embed: its input embedding module.
        layouts: one per row.
        suffixes: ``(rows, suffix length, hidden)`` suffix embeddings.

    Returns:
        ``(rows,)`` losses.
    """
    device = suffixes.device
    sequences = [layout.before + [0] * suffixes.shape[1] + layout.after + layout.target for layout in layouts]
    width = max(len(s) for s in sequences)
    input_ids = torch.zeros((len(layouts), width), dtype=torch.long, device=device)
    mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    suffix_rows, suffix_columns = [], []
    for row, (layout, sequence) in enumerate(zip(layouts, sequences)):
        pad = width - len(sequence)  # left padding, as generation pads
        input_ids[row, pad:] = torch.tensor(sequence)
        mask[row, pad:] = 1
        labels[row, width - len(layout.target) :] = torch.tensor(layout.target)
        start = pad + len(layout.before)
        suffix_rows += [row] * suffixes.shape[1]
        suffix_columns += range(start, start + suffixes.shape[1])
    embeddings = embed(input_ids).detach().clone()
    embeddings[suffix_rows, suffix_columns] = suffixes.reshape(-1, suffixes.shape[-1]).to(embeddings.dtype)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(inputs_embeds=embeddings, attention_mask=mask, position_ids=position_ids).logits
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )
    return losses.sum(-1) / (labels[:, 1:] != IGNORE_INDEX).sum(-1)


def optimise_suffixes(
    model,
    tokenizer,
    layouts: Sequence[SuffixLayout],
    *,
    suffix_tokens: int,
    init: str,
    steps: int,
    step_size: float,
    optimizer: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Optimise one suffix per layout toward its target.

    Returns:
        ``(suffixes, loss_before, loss_after)``: the best suffix of each row ``(rows, suffix_tokens, hidden)``
        (float32), its loss with the initial suffix and with the returned one.
    """
    embed = model.get_input_embeddings()
    device = embed.weight.device
    init_ids = tokenizer(init, add_special_tokens=False)["input_ids"]
    if not init_ids:
        raise ConfigError(
            f"eval_attacks: the embedding attack's init string {init!r} has no token; set init to e.g. '!'."
        )
    init_ids = (init_ids * suffix_tokens)[:suffix_tokens]
    with torch.no_grad():
        initial = embed(torch.tensor(init_ids, device=device)).float()
    suffixes = initial.expand(len(layouts), -1, -1).clone().requires_grad_(True)
    adam = torch.optim.Adam([suffixes], lr=step_size) if optimizer == "adam" else None
    best_loss = torch.full((len(layouts),), float("inf"), device=device)
    best = suffixes.detach().clone()
    loss_before = None
    for step in range(steps + 1):  # the last pass scores the last update
        losses = target_losses(model, embed, layouts, suffixes)
        with torch.no_grad():
            loss_before = losses.detach().clone() if loss_before is None else loss_before
            improved = losses < best_loss
            best_loss = torch.where(improved, losses.detach(), best_loss)
            best[improved] = suffixes.detach()[improved]
        if step == steps:
            break
        (gradient,) = torch.autograd.grad(losses.sum(), suffixes)  # each row's loss depends on its suffix only
        if adam is not None:
            suffixes.grad = gradient
            adam.step()
        else:
            with torch.no_grad():
                suffixes -= step_size * gradient.sign()
    return best, loss_before, best_loss


def embedding_attack_answers(
    generator,
    rows: Sequence[dict[str, Any]],
    spec: Mapping[str, Any],
    *,
    max_new_tokens: int,
    batch_size: int,
    system_prompt: str | None = None,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Optimise a suffix per prompt (``spec``: steps, suffix_tokens, step_size, optimizer, init, target,
    use_target_column, batch_size) and answer greedily from the embeddings.

    Returns:
        The answered rows (copies, with ``target``, ``target_loss_before`` and ``target_loss_after``) and
        ``target_loss``: the mean loss over prompts before and after the optimisation.

    Raises:
        ConfigError: a non-local backend or an unknown optimizer.
    """
    from sdd.evaluation.generation import LocalGenerator
    from sdd.generation import decode_answer, generate_token_ids_from_embeddings, stop_token_ids

    if not isinstance(generator, LocalGenerator):
        raise ConfigError("The embedding attack needs the model's gradients; set eval.generation.backend=local.")
    model, tokenizer = generator.model, generator.tokenizer
    stops = stop_token_ids(tokenizer, model)
    batch_size = int(spec.get("batch_size") or batch_size)
    answered = [dict(row) for row in rows]
    for row in answered:
        column = row.get(TARGET_COLUMN) if spec.get("use_target_column", True) else None
        row["target"] = column or spec["target"]
    layouts = [suffix_layout(tokenizer, r["prompt"], r["target"], system_prompt, stops) for r in answered]
    embed = model.get_input_embeddings()
    was_training = model.training
    model.eval()
    prompts: list[torch.Tensor] = []
    try:
        for start in range(0, len(layouts), batch_size):
            batch = layouts[start : start + batch_size]
            with torch.enable_grad():
                suffixes, before, after = optimise_suffixes(
                    model,
                    tokenizer,
                    batch,
                    suffix_tokens=int(spec["suffix_tokens"]),
                    init=str(spec.get("init", "!")),
                    steps=int(spec["steps"]),
                    step_size=float(spec["step_size"]),
                    optimizer=str(spec["optimizer"]),
                )
            for offset, (layout, suffix) in enumerate(zip(batch, suffixes)):
                row = answered[start + offset]
                row["target_loss_before"], row["target_loss_after"] = float(before[offset]), float(after[offset])
                with torch.no_grad():
                    around = [
                        embed(torch.tensor(ids, dtype=torch.long, device=suffix.device)).float()
                        for ids in (layout.before, layout.after)
                    ]
                prompts.append(torch.cat([around[0], suffix, around[1]]).detach())
    finally:
        model.train(was_training)
    token_ids = generate_token_ids_from_embeddings(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
    )
    for row, ids in zip(answered, token_ids):
        row["answer"] = decode_answer(tokenizer, ids, stops)
    before, after = (
        sum(r[key] for r in answered) / len(answered) for key in ("target_loss_before", "target_loss_after")
    )
    return answered, {
        "target_loss": {
            "before": before,
            "after": after,
            "what": "mean cross-entropy per target token, averaged over prompts",
        }
    }


def check_embedding_spec(label: str, spec: Mapping[str, Any]) -> None:
    """Refuse an embedding-attack spec with missing or out-of-range settings (before anything runs)."""
    for key in ("steps", "suffix_tokens", "step_size", "optimizer", "target"):
        if spec.get(key) in (None, ""):
            raise ConfigError(f"eval_attacks.{label}.{key} is missing (see conf/attack/embedding_attack.yaml).")
    if spec["optimizer"] not in OPTIMIZERS:
        raise ConfigError(
            f"eval_attacks.{label}.optimizer must be one of {', '.join(OPTIMIZERS)}, got '{spec['optimizer']}'."
        )
    if int(spec["steps"]) < 0 or int(spec["suffix_tokens"]) < 1 or float(spec["step_size"]) <= 0:
        raise ConfigError(
            f"eval_attacks.{label} needs steps >= 0, suffix_tokens >= 1 and step_size > 0 "
            f"(got {spec['steps']}, {spec['suffix_tokens']}, {spec['step_size']})."
        )
