"""Prefilling attack (evaluation-time): the assistant turn starts with the first k tokens of a harmful answer.

Qi et al. 2025, "Safety Alignment Should Be Made More Than Just a Few Tokens Deep" (ICLR 2025), show that
the safety behaviour of aligned models lives mostly in the first few tokens of the answer: when the
answer is prefilled with the first k tokens of a harmful response (they vary k over 5, 10, 20, 40), aligned
models continue it. Andriushchenko et al. 2024 ("Jailbreaking Leading Safety-Aligned LLMs with Simple
Adaptive Attacks") use prefilling as an attack on models whose API allows it.

What we interpreted (our choices):

- The harmful answer is the ``prefill`` column of the evaluation prompt set
  (``corpus.eval_prompts.<set>.columns.prefill``:
  the demo's compliance openings, AdvBench's targets, BeaverTails' unsafe responses). Prompts without one
  are skipped and counted; an answer shorter than k tokens is prefilled whole (counted too).
- The k tokens are the first k tokens of that answer as the shared chat path tokenizes it in an assistant
  turn (:func:`sdd.chat.segment_conversation`, the backbone tokenizer), the template's end-of-turn marker
  excluded. Decoding then continues greedily from them (:func:`sdd.generation.generate_token_ids`).
- The answer judged is prefix + continuation: the text the model's turn holds, as a user of the attacked
  model would read it.
- Local generation only: an OpenAI-compatible server would re-tokenize the prefix text, so the k tokens
  would not be the ones the model sees; ``eval.generation.backend=openai`` is refused for this attack.
"""

from __future__ import annotations

from typing import Any, Sequence

from sdd.chat import instruction_answer, segment_conversation
from sdd.errors import ConfigError

PREFILL_COLUMN = "prefill"


def answer_prefix_ids(
    tokenizer, prompt: str, answer: str, system_prompt: str | None = None, stop_ids: Sequence[int] = ()
) -> list[int]:
    """The token ids of ``answer`` as the chat path places it in the assistant turn after ``prompt``.

    The assistant segment of the rendered exchange is tokenized on its own (as training and generation
    tokenize it) and cut before its first stop token (the template's end-of-turn marker).
    """
    segments = segment_conversation(tokenizer, instruction_answer(prompt, answer, system_prompt))
    ids = tokenizer(segments[-1][0], add_special_tokens=False)["input_ids"]
    stops = set(stop_ids)
    end = next((i for i, token in enumerate(ids) if token in stops), len(ids))
    return ids[:end]


def prefill_answers(
    generator,
    rows: Sequence[dict[str, Any]],
    prefill_tokens: int,
    *,
    max_new_tokens: int,
    batch_size: int,
    system_prompt: str | None = None,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Greedy answers that start with the first ``prefill_tokens`` tokens of each row's harmful answer.

    Args:
        generator: the evaluation's backend; must be :class:`sdd.evaluation.generation.LocalGenerator`.
        rows: harmful prompts (``prompt``, ``prompt_set``, ``category`` and, where the set has one, ``prefill``).
        prefill_tokens: k, the number of answer tokens prefilled.
        max_new_tokens: the most tokens generated after the prefix.
        batch_size: the most rows decoded together.
        system_prompt: an optional system turn.
        progress: show a progress bar.

    Returns:
        The answered rows (copies, ``answer`` = prefix + continuation, ``prefill_text`` the prefix and
        ``prefill_tokens`` its length) and counts: ``num_without_prefill`` (skipped) and
        ``num_prefill_shorter_than_k`` (prefilled whole).

    Raises:
        ConfigError: a non-local backend, k < 1, or no row with a ``prefill`` answer.
    """
    from sdd.evaluation.generation import LocalGenerator
    from sdd.generation import decode_answer, generate_token_ids, stop_token_ids

    if not isinstance(generator, LocalGenerator):
        raise ConfigError(
            "The prefilling attack runs on the local model (the prefix must be the model's own tokens); "
            "set eval.generation.backend=local."
        )
    if int(prefill_tokens) < 1:
        raise ConfigError(f"eval_attacks: prefill_tokens must be positive integers, got {prefill_tokens}.")
    model, tokenizer = generator.model, generator.tokenizer
    stops = stop_token_ids(tokenizer, model)
    answered = [dict(row) for row in rows if row.get(PREFILL_COLUMN)]
    if not answered:
        raise ConfigError(
            "The prefilling attack needs harmful answers, and no evaluation prompt has one. Fix: map a column of "
            "harmful answers with corpus.eval_prompts.<set>.columns.prefill=<column> (e.g. AdvBench's target, "
            "BeaverTails' response)."
        )
    prefixes, shorter = [], 0
    for row in answered:
        ids = answer_prefix_ids(tokenizer, row["prompt"], row[PREFILL_COLUMN], system_prompt, stops)
        shorter += len(ids) < prefill_tokens
        prefixes.append(ids[: int(prefill_tokens)])
    continuations = generate_token_ids(
        model,
        tokenizer,
        [r["prompt"] for r in answered],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        system_prompt=system_prompt,
        progress=progress,
        answer_prefix_ids=prefixes,
    )
    for row, prefix, continuation in zip(answered, prefixes, continuations):
        row["prefill_text"] = tokenizer.decode(prefix, skip_special_tokens=True)
        row["prefill_tokens"] = len(prefix)
        row["answer"] = decode_answer(tokenizer, prefix + continuation, stops)  # decoded together: no seam
    return answered, {"num_without_prefill": len(rows) - len(answered), "num_prefill_shorter_than_k": shorter}
