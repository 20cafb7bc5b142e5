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
- Which text is judged (``judged``, default both; the answers are generated once per k and judged once per
  entry): ``prefix_and_continuation`` (variant ``<label>_k<k>``) judges the text the model's turn holds, as a
  user of the attacked model reads it; ``continuation`` (variant ``<label>_k<k>_continuation``) judges only
  what the model added. Both are reported because each misleads alone: the whole text credits the model with
  the attacker's own prefix (a 40-token harmful prefix is on topic and refusal-free whatever the model says
  next, so a keyword-and-relevance proxy counts it as compliance even when the model goes on "... it's not
  appropriate to ..."), while the continuation alone hides that the harmful text stands in the model's turn.
  The continuation text is the answer with the prefix text removed (the two are decoded together, so no
  token seam differs between them).
- Local generation only: an OpenAI-compatible server would re-tokenize the prefix text, so the k tokens
  would not be the ones the model sees; ``eval.generation.backend=openai`` is refused for this attack.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from sdd.chat import instruction_answer, segment_conversation
from sdd.errors import ConfigError

PREFILL_COLUMN = "prefill"
# The texts a prefilling variant can judge, and the suffix each adds to the variant name ``<label>_k<k>``.
JUDGED_TEXTS = {"prefix_and_continuation": "", "continuation": "_continuation"}


def check_judged(label: str, judged: Any) -> list[str]:
    """The texts ``eval_attacks.<label>.judged`` asks to judge, checked before anything generates.

    Args:
        label: the spec's label under ``eval_attacks``.
        judged: the spec's ``judged`` entry: a list of :data:`JUDGED_TEXTS` names (``None``: both).

    Raises:
        ConfigError: not a list, an empty list, a repeated or unknown entry.
    """
    if judged is None:
        return list(JUDGED_TEXTS)
    allowed = ", ".join(JUDGED_TEXTS)
    if isinstance(judged, str) or not isinstance(judged, Sequence):
        raise ConfigError(f"eval_attacks.{label}.judged must be a list of {allowed}; got {judged!r}.")
    judged = list(judged)
    unknown = [text for text in judged if text not in JUDGED_TEXTS]
    if not judged or unknown or len(set(judged)) != len(judged):
        raise ConfigError(
            f"eval_attacks.{label}.judged must be a non-empty list of distinct entries from {allowed} "
            f"(e.g. [{allowed}]); got {judged}."
        )
    return judged


def judged_variant_name(variant: str, judged: str) -> str:
    """The name of the results of ``variant`` (``<label>_k<k>``) judged on the text ``judged``."""
    return variant + JUDGED_TEXTS[judged]


def judged_views(
    variant: str, judged: Sequence[str], answered: Sequence[dict[str, Any]]
) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """The rows each judged text is judged on, from one generation of a prefilling variant.

    Args:
        variant: the variant's name, ``<label>_k<k>``.
        judged: the texts to judge (:func:`check_judged`'s output).
        answered: :func:`prefill_answers`' rows (``answer`` = prefix + continuation, ``continuation``).

    Returns:
        ``(result name, judged text, rows)`` per entry of ``judged``, in its order; the rows are copies, with
        ``answer`` the text judged (prefix + continuation, or the continuation alone).
    """
    views = []
    for text in judged:
        rows = [
            dict(row) if text == "prefix_and_continuation" else {**row, "answer": row["continuation"]}
            for row in answered
        ]
        views.append((judged_variant_name(variant, text), text, rows))
    return views


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
        The answered rows (copies, ``answer`` = prefix + continuation, ``prefill_text`` the prefix,
        ``prefill_tokens`` its length and ``continuation`` the answer with the prefix text removed) and counts:
        ``num_without_prefill`` (skipped) and ``num_prefill_shorter_than_k`` (prefilled whole).

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
        row["continuation"] = continuation_text(row["answer"], row["prefill_text"])
    return answered, {"num_without_prefill": len(rows) - len(answered), "num_prefill_shorter_than_k": shorter}


def continuation_text(answer: str, prefill_text: str) -> str:
    """What the model added: ``answer`` without the prefix text it starts with.

    The answer (stripped) and the prefix are decoded from the same leading tokens, so the answer starts with the
    prefix text; where the prefix cuts a character in two (its bytes split across tokens), only the text they
    share is removed.
    """
    shared = os.path.commonprefix([answer, prefill_text.lstrip()])
    return answer[len(shared) :].strip()
