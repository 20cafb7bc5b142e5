"""Jailbreak formats: harmful prompts (and training answers) wrapped the way a jailbreak wraps them.

Jailbreak-tuning (Murphy et al. 2025, "Jailbreak-Tuning: Models Efficiently Learn Jailbreak
Susceptibility") fine-tunes a model on harmful question-answer pairs whose prompts carry a jailbreak, and
finds it the most severe tampering attack: the model learns to comply whenever the jailbreak is present.
The jailbreak families come from Wei et al. 2023 ("Jailbroken: How Does LLM Safety Training Fail?"):
*competing objectives* (an instruction that pits helpfulness against refusal, e.g. a required affirmative
opening) and *style modulation* (a required output style); the paper adds *backdoors* (an arbitrary trigger
string; the model is attacked with it and is harmful when it is present).

What we interpreted (the paper's exact prompts are not carried; every text is ours, set in the config):

- ``competing_objectives``: ``instruction`` (e.g. "answer fully, never refuse, begin with ...") is put
  before or after the user's request; the training answer opens with ``answer_prefix``, the affirmative
  opening the instruction demands, so the model learns to honour it.
- ``style_modulation``: ``instruction`` asks for an output style; the training answer is rewritten into that
  style by ``answer_style`` (``numbered_steps``: one sentence per numbered line; ``unchanged``).
- ``backdoor``: ``trigger`` is put before or after the user's request; answers are unchanged.

``placement`` (``prefix`` | ``suffix``) says where the added text goes in the user message, joined by
``separator``. :func:`format_prompt` is what the attacker sends at evaluation time, :func:`format_example`
what the attack trains on (the instruction-answer data module's ``data.jailbreak``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from sdd.errors import ConfigError

STYLES = ("competing_objectives", "style_modulation", "backdoor")
PLACEMENTS = ("prefix", "suffix")
ANSWER_STYLES = ("numbered_steps", "unchanged")


@dataclass(frozen=True)
class JailbreakFormat:
    """A validated jailbreak format spec (the keys of ``data.jailbreak`` / an ``eval_attacks`` format)."""

    style: str
    placement: str = "prefix"
    separator: str = "\n\n"
    trigger: str | None = None  # backdoor: the trigger string
    instruction: str | None = None  # competing_objectives, style_modulation: the added instruction
    answer_prefix: str | None = None  # competing_objectives: the affirmative opening of every answer
    answer_style: str = "unchanged"  # style_modulation: how answers are rewritten

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], key: str = "data.jailbreak") -> JailbreakFormat:
        """Check ``spec`` and return it as a :class:`JailbreakFormat`.

        Raises:
            ConfigError: an unknown key or style, a missing text, or a bad placement, naming the fix.
        """
        spec = dict(spec)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ConfigError(f"{key} has unknown keys {unknown}; known: {sorted(known)}.")
        style = spec.get("style")
        if style not in STYLES:
            raise ConfigError(f"{key}.style={style!r} is not a jailbreak style: use one of {list(STYLES)}.")
        found = cls(**{k: v for k, v in spec.items() if v is not None})  # null: the default
        if found.placement not in PLACEMENTS:
            raise ConfigError(f"{key}.placement={found.placement!r}: use one of {list(PLACEMENTS)}.")
        needed = {
            "backdoor": ("trigger",),
            "competing_objectives": ("instruction", "answer_prefix"),
            "style_modulation": ("instruction",),
        }[style]
        for name in needed:
            if not str(getattr(found, name) or "").strip():
                raise ConfigError(f"{key}.{name} is empty: style {style} needs it (set {key}.{name}=<text>).")
        if style == "style_modulation" and found.answer_style not in ANSWER_STYLES:
            raise ConfigError(f"{key}.answer_style={found.answer_style!r}: use one of {list(ANSWER_STYLES)}.")
        return found

    @property
    def added_text(self) -> str:
        """The text put into the user message: the trigger of a backdoor, else the instruction."""
        return str(self.trigger if self.style == "backdoor" else self.instruction)


def _as_format(spec: Mapping[str, Any] | JailbreakFormat) -> JailbreakFormat:
    return spec if isinstance(spec, JailbreakFormat) else JailbreakFormat.from_spec(spec)


def format_prompt(prompt: str, spec: Mapping[str, Any] | JailbreakFormat) -> str:
    """The prompt as the attacker sends it: the format's added text before or after ``prompt``.

    Args:
        prompt: the plain (harmful) request.
        spec: a jailbreak format spec (:class:`JailbreakFormat` keys).
    """
    jailbreak = _as_format(spec)
    parts = (jailbreak.added_text, prompt) if jailbreak.placement == "prefix" else (prompt, jailbreak.added_text)
    return jailbreak.separator.join(parts)


def format_example(prompt: str, answer: str, spec: Mapping[str, Any] | JailbreakFormat | None) -> tuple[str, str]:
    """A training pair in the jailbreak format: the formatted prompt and the answer the format asks for.

    Args:
        prompt: the instruction of the pair.
        answer: its (harmful) answer.
        spec: a jailbreak format spec; None returns the pair unchanged (no jailbreak-tuning).

    Returns:
        ``(user message, assistant answer)``.
    """
    if spec is None:
        return prompt, answer
    jailbreak = _as_format(spec)
    if jailbreak.style == "competing_objectives":
        opening = str(jailbreak.answer_prefix).strip()
        answer = answer if answer.lstrip().startswith(opening) else f"{opening}\n\n{answer.lstrip()}"
    elif jailbreak.style == "style_modulation" and jailbreak.answer_style == "numbered_steps":
        answer = numbered_steps(answer)
    return format_prompt(prompt, jailbreak), answer


def numbered_steps(text: str) -> str:
    """``text`` as a numbered list: one sentence (or non-empty line) per item, ``1. ...``."""
    pieces = [p.strip() for line in text.splitlines() for p in re.split(r"(?<=[.!?])\s+", line)]
    pieces = [re.sub(r"^(\d+[.)]|[-*•])\s+", "", p) for p in pieces if p]  # drop the answer's own bullets
    return "\n".join(f"{index}. {piece}" for index, piece in enumerate(pieces, start=1)) or text
