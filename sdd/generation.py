"""The one generation path: batched greedy decoding of chat prompts (shared by every evaluation)."""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from sdd.chat import Conversation, tokenize_prompt, user_turn


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str | Conversation],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    system_prompt: str | None = None,
    progress: bool = False,
) -> list[str]:
    """Greedy answers to ``prompts`` (instructions or conversations ending with a user turn).

    Prompts are rendered with the backbone's chat template and the generation prompt, left-padded,
    and decoded with the KV cache; answers are the new tokens only, special tokens removed.
    """
    conversations = [user_turn(p, system_prompt) if isinstance(p, str) else list(p) for p in prompts]
    token_ids = [tokenize_prompt(tokenizer, c) for c in conversations]
    # Longest first, so a batch holds prompts of similar length (less padding); answers are put back
    # in the caller's order.
    order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
    answers: list[str] = [""] * len(token_ids)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="Generating", disable=not progress):
        width = max(len(token_ids[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            ids = token_ids[index]
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            pad_token_id=pad_id,
            eos_token_id=_stop_ids(tokenizer, model),
        )
        for row, index in enumerate(batch):
            answers[index] = tokenizer.decode(output[row, width:], skip_special_tokens=True).strip()
    model.train(was_training)
    return answers


def _stop_ids(tokenizer, model) -> list[int]:
    """EOS ids of the model's generation config and of the tokenizer (end-of-turn markers differ)."""
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)
