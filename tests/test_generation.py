"""The shared generation path: continuous, length-sorted batching returns, in the caller's order, the answers
of one-by-one greedy decoding; rows stop at the template's end of turn; a batch stops when every row has."""

from __future__ import annotations

import copy

import pytest
import torch

from sdd.chat import FALLBACK_CHAT_TEMPLATE, tokenize_prompt, user_turn
from sdd.generation import (
    decode_answer,
    end_of_turn_token_id,
    generate,
    generate_token_ids,
    stop_token_ids,
)

# Very different lengths: one word to ~150 tokens, so batches mix widths and the cache holds much padding.
PROMPTS = [
    "Hi",
    "How do I keep basil alive on a windowsill in winter? " * 6,
    "Name three planets please.",
    "Why?",
    "Tell me a story about a dragon and a knight who became friends after a long war between their peoples.",
    "What is two plus two, and why is it four rather than five?",
    "List",
    "Describe, step by step, how bread rises: yeast, sugar, warmth, gluten and time. " * 2,
    "Summarize the plot of a detective novel in one sentence.",
]


def reference_token_ids(model, tokenizer, prompts, max_new_tokens):
    """transformers' own greedy decoding, one prompt at a time (no padding), cut after the first stop token."""
    stops = stop_token_ids(tokenizer, model)
    answers = []
    for prompt in prompts:
        ids = torch.tensor([tokenize_prompt(tokenizer, user_turn(prompt))])
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stops,
        )
        new = output[0, ids.shape[1] :].tolist()
        stop = next((i for i, token in enumerate(new) if token in stops), None)
        answers.append(new if stop is None else new[: stop + 1])
    return answers


class StopAtPosition:
    """Makes the model emit ``stop_id`` as soon as the position it predicts for reaches ``position`` (a forward
    hook on the logits), so answers end at different steps for prompts of different lengths. Counts the
    forward passes that decode one token per row."""

    def __init__(self, model, stop_id: int, position: int) -> None:
        self.decode_steps = 0
        self.handle = model.register_forward_hook(self, with_kwargs=True)
        self.stop_id, self.position = stop_id, position

    def __call__(self, module, args, kwargs, output):
        input_ids = kwargs["input_ids"]
        self.decode_steps += input_ids.shape[1] == 1
        reached = kwargs["position_ids"][:, -1] + 1 >= self.position
        output.logits[reached, -1, :] = -1e4
        output.logits[reached, -1, self.stop_id] = 1e4
        return output


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batched_answers_equal_one_by_one_in_input_order(tiny_model, tiny_tokenizer, batch_size):
    reference = reference_token_ids(tiny_model, tiny_tokenizer, PROMPTS, max_new_tokens=12)
    assert len({tuple(ids) for ids in reference}) == len(PROMPTS)  # distinct answers: a reordering would show
    tiny_model.train()
    token_ids = generate_token_ids(tiny_model, tiny_tokenizer, PROMPTS, max_new_tokens=12, batch_size=batch_size)
    assert token_ids == reference
    assert tiny_model.training  # the caller's mode is restored
    stops = stop_token_ids(tiny_tokenizer, tiny_model)
    answers = generate(tiny_model, tiny_tokenizer, PROMPTS, max_new_tokens=12, batch_size=batch_size)
    assert answers == [decode_answer(tiny_tokenizer, ids, stops) for ids in reference]


def test_a_batch_stops_when_every_row_has_emitted_a_stop_token(tiny_model, tiny_tokenizer):
    end_of_turn = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    lengths = [len(tokenize_prompt(tiny_tokenizer, user_turn(p))) for p in PROMPTS]
    position = max(lengths) + 5  # the longest prompt gets 5 tokens, the shortest many more
    hook = StopAtPosition(tiny_model, end_of_turn, position)
    try:
        reference = reference_token_ids(tiny_model, tiny_tokenizer, PROMPTS, max_new_tokens=500)
        assert [len(ids) for ids in reference] == [position - n + 1 for n in lengths]  # answer: positions n..position
        assert all(ids[-1] == end_of_turn for ids in reference)

        hook.decode_steps = 0
        answers = generate_token_ids(tiny_model, tiny_tokenizer, PROMPTS, max_new_tokens=500, batch_size=len(PROMPTS))
        assert answers == reference
        # One prefill, then one step per token of the longest answer: not max_new_tokens (500).
        assert hook.decode_steps == max(len(ids) for ids in reference) - 1

        # Three rows: a finished row's place goes to a waiting prompt, answers unchanged and in order.
        hook.decode_steps = 0
        assert generate_token_ids(tiny_model, tiny_tokenizer, PROMPTS, max_new_tokens=500, batch_size=3) == reference
        assert hook.decode_steps < sum(len(ids) - 1 for ids in reference) / 2
    finally:
        hook.handle.remove()


def test_max_new_tokens_caps_every_answer(tiny_model, tiny_tokenizer):
    token_ids = generate_token_ids(tiny_model, tiny_tokenizer, PROMPTS[:4], max_new_tokens=1, batch_size=2)
    assert [len(ids) for ids in token_ids] == [1, 1, 1, 1]
    assert generate_token_ids(tiny_model, tiny_tokenizer, [], max_new_tokens=4) == []
    with pytest.raises(ValueError, match="batch_size"):
        generate(tiny_model, tiny_tokenizer, PROMPTS[:1], batch_size=0)


def test_models_with_sliding_window_attention_decode_in_static_batches(tiny_tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    from sdd.generation import _cache_argument

    torch.manual_seed(0)
    model = MistralForCausalLM(
        MistralConfig(
            vocab_size=len(tiny_tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=16,
            pad_token_id=tiny_tokenizer.pad_token_id,
        )
    )
    assert _cache_argument(model) is None  # its cache keeps a window: the continuous path does not manage it
    reference = reference_token_ids(model, tiny_tokenizer, PROMPTS[:5], max_new_tokens=6)
    assert generate_token_ids(model, tiny_tokenizer, PROMPTS[:5], max_new_tokens=6, batch_size=2) == reference


# ---------------------------------------------------------------------------------- stop tokens
def tokenizer_with(tiny_tokenizer, template: str, added: list[str] = (), eos: str | None = None):
    from transformers import AddedToken

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.add_tokens([AddedToken(token, special=True) for token in added], special_tokens=True)
    if eos is not None:
        tokenizer.eos_token = eos
    tokenizer.chat_template = template
    return tokenizer


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA2 = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA3 = (
    "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] "
    "+ '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
PLAIN = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"


def test_stop_ids_include_each_templates_end_of_turn_token(tiny_tokenizer, tiny_model):
    # ChatML (SmolLM2): <|im_end|>, although the tokenizer's EOS is another token.
    chatml = tokenizer_with(tiny_tokenizer, CHATML, eos="<|endoftext|>")
    im_end, endoftext = chatml.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert chatml.eos_token_id == endoftext != im_end
    assert end_of_turn_token_id(chatml) == im_end
    assert {im_end, endoftext} <= set(stop_token_ids(chatml))

    # Llama-2: the answer is followed by " </s>"; the space is a plain token, the stop is </s>.
    llama2 = tokenizer_with(tiny_tokenizer, LLAMA2, added=["<s>", "</s>"], eos="</s>")
    assert end_of_turn_token_id(llama2) == llama2.convert_tokens_to_ids("</s>")
    assert llama2.convert_tokens_to_ids("</s>") in stop_token_ids(llama2)

    # Llama-3: <|eot_id|> ends a turn, <|end_of_text|> is the EOS; both stop.
    llama3 = tokenizer_with(
        tiny_tokenizer,
        LLAMA3,
        added=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"],
        eos="<|end_of_text|>",
    )
    eot, end_of_text = llama3.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    assert end_of_turn_token_id(llama3) == eot
    assert {eot, end_of_text} <= set(stop_token_ids(llama3))

    # Our fallback template (base models) ends the answer with the EOS.
    fallback = tokenizer_with(tiny_tokenizer, FALLBACK_CHAT_TEMPLATE, eos="<|endoftext|>")
    assert end_of_turn_token_id(fallback) == endoftext

    # A template that marks turns with plain text has no end-of-turn token: the EOS still stops.
    plain = tokenizer_with(tiny_tokenizer, PLAIN)
    assert end_of_turn_token_id(plain) is None
    assert stop_token_ids(plain) == [plain.eos_token_id]

    # The model's generation config adds its EOS ids.
    model = copy.deepcopy(tiny_model)
    model.generation_config.eos_token_id = [endoftext, 7]
    assert stop_token_ids(plain, model) == sorted({plain.eos_token_id, endoftext, 7})


def test_a_row_stops_at_the_end_of_turn_token_even_when_it_is_not_the_eos(tiny_model, tiny_tokenizer):
    chatml = tokenizer_with(tiny_tokenizer, CHATML, eos="<|endoftext|>")
    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    model = copy.deepcopy(tiny_model)
    model.generation_config.eos_token_id = chatml.eos_token_id
    hook = StopAtPosition(model, im_end, position=len(tokenize_prompt(chatml, user_turn("Hi"))) + 2)
    try:
        token_ids = generate_token_ids(model, chatml, ["Hi"], max_new_tokens=50)
    finally:
        hook.handle.remove()
    assert len(token_ids[0]) == 3 and token_ids[0][-1] == im_end
    assert "<|im_end|>" not in generate(model, chatml, ["Hi"], max_new_tokens=50)[0]


def test_the_preallocated_cache_grows_when_a_write_overflows_it():
    from sdd.generation import _preallocated_layer_class

    keys, values = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)
    layer = _preallocated_layer_class()(keys.clone(), values.clone(), length=1)
    more_keys, more_values = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    got_keys, got_values = layer.update(more_keys, more_values)
    assert torch.equal(got_keys, torch.cat([keys[:, :, :1], more_keys], dim=2))
    assert torch.equal(got_values, torch.cat([values[:, :, :1], more_values], dim=2))
    assert layer.get_seq_length() == 5
