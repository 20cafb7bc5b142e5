"""Chat formatting and label masking: exactly the answer tokens carry labels."""

from __future__ import annotations

import pytest

from sdd.backbones import TINY_CHAT_TEMPLATE
from sdd.chat import (
    FALLBACK_CHAT_TEMPLATE,
    IGNORE_INDEX,
    ChatFormatError,
    instruction_answer,
    render,
    segment_conversation,
    tokenize_conversation,
    tokenize_prompt,
)

# ChatML with a default system message, the shape of SmolLM2-Instruct's own template.
CHATML_WITH_DEFAULT_SYSTEM = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(params=["tiny", "chatml_default_system", "fallback"])
def tokenizer(request, tiny_tokenizer):
    tokenizer = tiny_tokenizer
    template = {
        "tiny": TINY_CHAT_TEMPLATE,
        "chatml_default_system": CHATML_WITH_DEFAULT_SYSTEM,
        "fallback": FALLBACK_CHAT_TEMPLATE,
    }[request.param]
    original = tokenizer.chat_template
    tokenizer.chat_template = template
    yield tokenizer
    tokenizer.chat_template = original


def labelled_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


def test_single_turn_labels_are_exactly_the_answer(tokenizer):
    conversation = instruction_answer("How do plants make food?", "By photosynthesis, using light.")
    example = tokenize_conversation(tokenizer, conversation, max_length=512)
    prompt_ids = tokenize_prompt(tokenizer, conversation[:-1])

    # Prompt tokens are exactly the inference prompt, and all of them are masked.
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    assert all(label == IGNORE_INDEX for label in example.labels[: len(prompt_ids)])
    # Every token after the prompt is labelled with itself: the answer and the end-of-turn marker.
    assert example.labels[len(prompt_ids) :] == example.input_ids[len(prompt_ids) :]
    answer_text = labelled_text(tokenizer, example)
    assert answer_text.startswith("By photosynthesis, using light.")
    assert tokenizer.eos_token in answer_text  # the model learns to stop
    assert "How do plants" not in answer_text


def test_multi_turn_labels_only_assistant_turns(tokenizer):
    conversation = [
        {"role": "user", "content": "Name a planet."},
        {"role": "assistant", "content": "Mars."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Venus."},
    ]
    example = tokenize_conversation(tokenizer, conversation, max_length=512)
    segments = segment_conversation(tokenizer, conversation)
    assert [trainable for _, trainable in segments] == [False, True, False, True]
    assert "".join(text for text, _ in segments) == render(tokenizer, conversation)

    labelled = labelled_text(tokenizer, example)
    assert "Mars." in labelled and "Venus." in labelled
    assert "Name a planet" not in labelled and "Another one" not in labelled
    # Token count of labels equals the tokens of the two assistant segments.
    expected = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text, t in segments if t)
    assert sum(label != IGNORE_INDEX for label in example.labels) == expected


def test_unmasked_prompt_labels_every_token(tiny_tokenizer):
    conversation = instruction_answer("Hi", "Hello there.")
    example = tokenize_conversation(tiny_tokenizer, conversation, max_length=512, mask_prompt=False)
    assert example.labels == example.input_ids


def test_truncation_is_on_the_right_and_flagged(tiny_tokenizer):
    conversation = instruction_answer("Hi", "word " * 200)
    example = tokenize_conversation(tiny_tokenizer, conversation, max_length=32)
    assert len(example.input_ids) == len(example.labels) == 32
    assert example.truncated
    assert not tokenize_conversation(tiny_tokenizer, conversation, max_length=10_000).truncated


def test_conversation_must_end_with_an_answer(tiny_tokenizer):
    with pytest.raises(ChatFormatError, match="assistant"):
        tokenize_conversation(tiny_tokenizer, [{"role": "user", "content": "hi"}], max_length=64)


def test_template_that_is_not_prefix_consistent_is_refused(tiny_tokenizer):
    original = tiny_tokenizer.chat_template
    # Renders the generation prompt differently from the start of the assistant turn.
    tiny_tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<<answer>>{% endif %}"
    )
    try:
        with pytest.raises(ChatFormatError, match="chat_template"):
            tokenize_conversation(tiny_tokenizer, instruction_answer("a", "b"), max_length=64)
    finally:
        tiny_tokenizer.chat_template = original
