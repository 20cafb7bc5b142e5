"""The one path from conversations to token ids: chat formatting and label masking.

Every data module (defense data, attack data) and every generation call goes through this file, so
the model sees at evaluation exactly the prompt format it was trained on.

A conversation is a list of ``{"role": "system" | "user" | "assistant", "content": str}``. The
backbone's own chat template renders it; a base model without a template gets
:data:`FALLBACK_CHAT_TEMPLATE` (installed by :func:`ensure_chat_template`).

Masking is exact by construction: the rendered text is cut into segments at the boundaries of the
assistant turns (found by rendering the conversation up to each turn with the generation prompt),
each segment is tokenized on its own, and only the tokens of assistant segments carry labels. The
prompt at inference is tokenized the same way (the generation prompt alone), so training and
generation agree token for token at the boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from sdd.errors import UserError

IGNORE_INDEX = -100

Message = dict[str, str]
Conversation = list[Message]

# Alpaca-style template for base models that ship no chat template (Llama-2-7b, Phi-2). The answer
# ends with the EOS token so the model learns to stop. System text, if any, opens the prompt.
FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### Instruction:\n{{ message['content'] }}\n\n### Response:\n"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}\n\n"
    "{% endif %}"
    "{% endfor %}"
)


class ChatFormatError(UserError, ValueError):
    """A conversation cannot be rendered or masked."""


def ensure_chat_template(tokenizer, fallback: str | None = FALLBACK_CHAT_TEMPLATE) -> bool:
    """Give ``tokenizer`` a chat template if it has none.

    Returns:
        True if the fallback template was installed.
    """
    if getattr(tokenizer, "chat_template", None):
        return False
    if fallback is None:
        raise ChatFormatError(
            "The backbone's tokenizer has no chat template and backbone.chat_template is null. "
            "Set backbone.chat_template to a Jinja template (or leave it at the default fallback)."
        )
    tokenizer.chat_template = fallback
    return True


def user_turn(instruction: str, system_prompt: str | None = None) -> Conversation:
    """A single-turn prompt as a conversation."""
    messages: Conversation = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": instruction})
    return messages


def instruction_answer(instruction: str, answer: str, system_prompt: str | None = None) -> Conversation:
    """A single-turn instruction/answer pair as a conversation."""
    return user_turn(instruction, system_prompt) + [{"role": "assistant", "content": answer}]


def render(tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """Render messages to text with the tokenizer's chat template."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as error:  # syntax errors, and templates that raise on a message they reject
        line = f" (line {error.lineno})" if getattr(error, "lineno", None) else ""
        raise ChatFormatError(
            f"The chat template does not render: {type(error).__name__}: {error}{line}. Fix backbone.chat_template "
            "(a Jinja template over `messages`), or set backbone.chat_template=fallback to use the tokenizer's own."
        ) from error


def check_chat_template(tokenizer) -> None:
    """Refuse a chat template that cannot render a user -> assistant exchange or drops the answer.

    Run once when a tokenizer gets a template from ``backbone.chat_template``, so a broken template fails
    before any model is loaded, with the key to fix.
    """
    probe = instruction_answer("Say the probe word.", "Tangerine-4417")
    text = render(tokenizer, probe)
    if "Tangerine-4417" not in text:
        raise ChatFormatError(
            "backbone.chat_template drops the assistant's answer (a rendered user -> assistant exchange does not "
            "contain the answer), so there is nothing to train on. Fix backbone.chat_template: it must write every "
            "message's content, assistant turns included."
        )
    segment_conversation(tokenizer, probe)


def segment_conversation(tokenizer, messages: Sequence[Message]) -> list[tuple[str, bool]]:
    """Cut the rendered conversation into ``(text, is_trainable)`` segments.

    An assistant segment runs from the end of the generation prompt before that turn to the end of
    the turn, so it includes the template's end-of-turn marker (the model must learn to stop).
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise ChatFormatError("A training conversation must end with an assistant turn.")
    segments: list[tuple[str, bool]] = []
    consumed = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_text = render(tokenizer, messages[:index], add_generation_prompt=True)
        turn_text = render(tokenizer, messages[: index + 1])
        if not prompt_text.startswith(consumed) or not turn_text.startswith(prompt_text):
            raise ChatFormatError(
                "The chat template does not render conversations prefix-consistently (the text up to "
                "an assistant turn is not a prefix of the text including it), so answer tokens cannot "
                "be located. Set backbone.chat_template to a template that does."
            )
        answer_text = turn_text[len(prompt_text) :]
        if not answer_text and message["content"]:
            raise ChatFormatError(
                "The chat template renders nothing for an assistant turn (the answer is dropped), so there is "
                "nothing to train on. Fix backbone.chat_template: it must write every message's content, "
                "assistant turns included."
            )
        if len(prompt_text) > len(consumed):
            segments.append((prompt_text[len(consumed) :], False))
        segments.append((answer_text, True))
        consumed = turn_text
    return segments


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


class PadCollator:
    """Right-pads a batch: ``input_ids`` with the pad id, ``labels`` with ``ignore_index``."""

    def __init__(self, pad_token_id: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.pad_token_id = pad_token_id
        self.ignore_index = ignore_index

    def __call__(self, examples: Sequence[TokenizedExample]) -> dict:
        import torch

        width = max(len(e.input_ids) for e in examples)
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), self.ignore_index, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            length = len(example.input_ids)
            input_ids[row, :length] = torch.tensor(example.input_ids)
            labels[row, :length] = torch.tensor(example.labels)
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def tokenize_conversation(
    tokenizer,
    messages: Sequence[Message],
    max_length: int,
    mask_prompt: bool = True,
    ignore_index: int = IGNORE_INDEX,
) -> TokenizedExample:
    """Token ids and labels for one conversation, truncated on the right to ``max_length``.

    Args:
        mask_prompt: if True, only assistant tokens carry labels (others get ``ignore_index``).
    """
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trainable in segment_conversation(tokenizer, messages):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids.extend(ids)
        labels.extend(ids if (trainable or not mask_prompt) else [ignore_index] * len(ids))
    return TokenizedExample(input_ids[:max_length], labels[:max_length], len(input_ids) > max_length)


def tokenize_prompt(tokenizer, messages: Sequence[Message]) -> list[int]:
    """Token ids of a prompt followed by the generation prompt, as the model sees it at inference."""
    text = render(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
