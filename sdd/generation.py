"""The one generation path: greedy decoding of chat prompts (shared by every evaluation).

Prompts are rendered with the backbone's chat template and tokenized once, then sorted by length.
Decoding keeps up to ``batch_size`` rows in flight (continuous batching):

- a row stops at its first stop token (the end-of-turn token of the chat template, or an EOS id of
  the tokenizer or the model's generation config; :func:`stop_token_ids`) or at ``max_new_tokens``,
  and leaves the batch; waiting prompts take the freed rows, prefilled in small length-sorted groups,
  so a batch neither decodes finished answers nor waits for its longest answer;
- the leading tokens every prompt shares (the template's header, a system prompt) are encoded once
  and their keys and values copied into each row's cache;
- the KV cache is preallocated for the rest of the decode, so appending a token writes in place
  (transformers' dynamic cache concatenates, copying the whole cache at every token).

Answers are greedy (argmax at every step), so they equal decoding each prompt alone, up to the
floating-point rounding that padding and batch shapes introduce; they come back in the caller's order.
Models whose cache this cannot manage (sliding-window or recurrent layers, remote code, transformers
without the ``Cache.layers`` API) are decoded in static length-sorted batches by ``model.generate``.
"""

from __future__ import annotations

import functools
import inspect
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from sdd.chat import ChatFormatError, Conversation, instruction_answer, render, tokenize_prompt, user_turn

# Rows prefilled in one forward pass: prompts are sorted by length, so a small group pads little.
PREFILL_ROWS = 16

_PROBE_ANSWER = "Tangerine-4417"


@torch.inference_mode()
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

    Args:
        model: a causal LM (transformers); put in eval mode for the call, its mode restored after.
        tokenizer: its tokenizer, with a chat template (:meth:`sdd.backbones.Backbone.load_tokenizer`).
        prompts: instructions (rendered as one user turn) or conversations.
        max_new_tokens: the most tokens generated per answer.
        batch_size: the most rows decoded together.
        system_prompt: a system turn put before each instruction (not before conversations).
        progress: show a progress bar over the answers.

    Returns:
        One answer per prompt, in the order of ``prompts``: the new tokens up to the first stop
        token, decoded with special tokens removed and surrounding whitespace stripped.
    """
    stops = stop_token_ids(tokenizer, model)
    token_ids = generate_token_ids(model, tokenizer, prompts, max_new_tokens, batch_size, system_prompt, progress)
    return [decode_answer(tokenizer, ids, stops) for ids in token_ids]


@torch.inference_mode()
def generate_token_ids(
    model,
    tokenizer,
    prompts: Sequence[str | Conversation],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    system_prompt: str | None = None,
    progress: bool = False,
    answer_prefix_ids: Sequence[Sequence[int]] | None = None,
) -> list[list[int]]:
    """The generated token ids of each prompt, up to and including its stop token if it emitted one.

    Same arguments as :func:`generate`, which decodes these ids, and:

    Args:
        answer_prefix_ids: per prompt, token ids the assistant turn starts with (prefilled after the
            generation prompt, e.g. by :mod:`sdd.attacks.prefilling`); decoding continues from them and
            the returned ids are the continuation only. None (or an empty prefix): the plain prompt.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(
            f"Generation needs max_new_tokens >= 1 and batch_size >= 1 (got {max_new_tokens}, "
            f"{batch_size}); fix the max_new_tokens / batch_size setting of the calling config."
        )
    conversations = [user_turn(p, system_prompt) if isinstance(p, str) else list(p) for p in prompts]
    prompt_ids = [tokenize_prompt(tokenizer, c) for c in conversations]
    if answer_prefix_ids is not None:
        if len(answer_prefix_ids) != len(prompt_ids):
            raise ValueError(f"{len(answer_prefix_ids)} answer prefixes for {len(prompt_ids)} prompts.")
        prompt_ids = [ids + [int(token) for token in prefix] for ids, prefix in zip(prompt_ids, answer_prefix_ids)]
    if not prompt_ids:
        return []
    if any(not ids for ids in prompt_ids):
        raise ChatFormatError("A prompt renders to no tokens; the chat template must write the user's message.")
    # Longest first: similar lengths share a prefill group (little padding), and the longest prompts,
    # which set the cache's width, are decoded while the batch is fullest.
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    stops = frozenset(stop_token_ids(tokenizer, model))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(prompt_ids), desc="Generating", disable=not progress)
    try:
        cache_argument = _cache_argument(model)
        if cache_argument is not None:
            try:
                decoder = _ContinuousDecoder(model, cache_argument, stops, max_new_tokens, pad_id)
                return decoder.run(prompt_ids, order, batch_size, bar)
            except _CacheNotManaged:
                bar.reset()
        return _decode_static_batches(model, prompt_ids, order, stops, max_new_tokens, batch_size, pad_id, bar)
    finally:
        bar.close()
        model.train(was_training)


def decode_answer(tokenizer, token_ids: Sequence[int], stop_ids: Sequence[int] = ()) -> str:
    """The text of generated ``token_ids``: a trailing stop token dropped, special tokens removed, stripped."""
    ids = list(token_ids)
    if ids and ids[-1] in set(stop_ids):
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """The token ids that end an answer.

    The end-of-turn token of the chat template (:func:`end_of_turn_token_id`: ``<|im_end|>`` for ChatML,
    ``</s>`` for Llama-2, ``<|eot_id|>`` for Llama-3, EOS for the fallback template), the tokenizer's EOS,
    and the EOS ids of the model's generation config: an instruct model may end its turn with any of them.
    """
    ids: set[int] = set()
    end_of_turn = end_of_turn_token_id(tokenizer)
    if end_of_turn is not None:
        ids.add(end_of_turn)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(ids)


def end_of_turn_token_id(tokenizer) -> int | None:
    """The special token the chat template writes after an assistant answer, read from the template itself.

    Renders a user -> assistant exchange with a probe answer and returns the first special token after
    the answer; if the template writes none there (some end a turn only by opening the next one), the
    first special token of a following user turn. None when the template marks turns with plain text.
    """
    special = set(tokenizer.all_special_ids) | {
        token_id
        for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items()
        if getattr(token, "special", False)
    }
    special.discard(tokenizer.unk_token_id)
    exchange = instruction_answer("Say the probe word.", _PROBE_ANSWER)
    for conversation in (exchange, exchange + [{"role": "user", "content": "Again."}]):
        try:
            text = render(tokenizer, conversation)
        except ChatFormatError:
            continue
        at = text.rfind(_PROBE_ANSWER)
        if at < 0:
            continue
        tail = tokenizer(text[at + len(_PROBE_ANSWER) :], add_special_tokens=False)["input_ids"]
        found = next((token_id for token_id in tail if token_id in special), None)
        if found is not None:
            return found
    return None


# ---------------------------------------------------------------------------------- continuous batching
class _CacheNotManaged(Exception):
    """The model did not fill the cache object it was given (remote code with its own cache format)."""


def _cache_argument(model) -> str | None:
    """The forward keyword that takes the KV cache, when the continuous path can manage this model's cache.

    That needs transformers' ``Cache.layers`` API and a model whose every layer keeps a plain, growing
    key/value cache (no sliding window, no recurrent state); None otherwise.
    """
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:
        return None
    try:
        parameters = inspect.signature(model.forward).parameters
        layers = DynamicCache(config=model.config).layers
    except Exception:  # a config or forward transformers' cache helpers do not understand
        return None
    name = next((n for n in ("cache", "past_key_values") if n in parameters), None)
    if name is None or "position_ids" not in parameters or "attention_mask" not in parameters:
        return None
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    return name


@functools.cache
def _preallocated_layer_class():
    """A key/value cache layer that appends into a buffer sized for the rest of the decode (defined on first
    use: transformers is imported lazily)."""
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int) -> None:
            super().__init__()
            self.key_buffer, self.value_buffer, self.length = key_buffer, value_buffer, length
            self.device = key_buffer.device
            self.is_initialized = True
            self._publish()

        def _publish(self) -> None:
            self.keys = self.key_buffer[:, :, : self.length]
            self.values = self.value_buffer[:, :, : self.length]

        def lazy_initialization(self, key_states, value_states) -> None:  # built initialized
            pass

        def update(self, key_states, value_states, *args, **kwargs):
            end = self.length + key_states.shape[-2]
            if end > self.key_buffer.shape[-2]:  # sized for the decode, so not expected: grow rather than fail
                extra = end - self.key_buffer.shape[-2] + self.key_buffer.shape[-2] // 2
                pad = (0, 0, 0, extra)
                self.key_buffer = torch.nn.functional.pad(self.key_buffer, pad)
                self.value_buffer = torch.nn.functional.pad(self.value_buffer, pad)
            self.key_buffer[:, :, self.length : end] = key_states
            self.value_buffer[:, :, self.length : end] = value_states
            self.length = end
            self._publish()
            return self.keys, self.values

    return PreallocatedLayer


@dataclass
class _Row:
    index: int  # position of the prompt in the caller's list
    length: int  # tokens this row attends to (prompt and answer so far), i.e. its next position id
    generated: list[int] = field(default_factory=list)
    done: bool = False


@dataclass
class _Block:
    """Rows with their KV cache and attention mask, right-aligned (padding on the left, masked)."""

    rows: list[_Row]
    keys: list[torch.Tensor]  # per layer: (rows, kv heads, width, head dim)
    values: list[torch.Tensor]
    mask: torch.Tensor  # (rows, width), 1 where the row attends
    next_tokens: torch.Tensor  # (rows,), what the next step feeds


class _ContinuousDecoder:
    """Greedy decoding with rows that leave when they finish and prompts that take their place.

    The prompts' shared leading tokens (chat-template header, system prompt) are encoded once and
    copied into every row's cache. A finished row keeps its place, masked and frozen, until a quarter of
    the batch has finished (or nothing is left to decode): the batch is then rebuilt without it, and
    with newly prefilled prompts, in one copy of the cache.
    """

    def __init__(self, model, cache_argument: str, stops: frozenset[int], max_new_tokens: int, pad_id: int) -> None:
        self.model = model
        self.cache_argument = cache_argument
        self.stops = stops
        self.max_new_tokens = max_new_tokens
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        self.logits_argument = (
            {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        )
        self.layer_class = _preallocated_layer_class()
        self.prefix: list[int] = []
        self.prefix_cache = None
        self.batch: _Block | None = None
        self.cache = None

    def run(self, prompt_ids: list[list[int]], order: list[int], batch_size: int, bar) -> list[list[int]]:
        self._encode_shared_prefix(prompt_ids)
        queue = deque(order)
        answers: list[list[int]] = [[] for _ in prompt_ids]
        refill_at = max(1, batch_size // 4)
        while queue or self.batch is not None:
            rows = self.batch.rows if self.batch is not None else []
            finished = [row for row in rows if row.done]
            live = len(rows) - len(finished)
            room = min(len(queue), batch_size - live)
            admit = room > 0 and room >= min(len(queue), refill_at)
            if admit or (finished and (not live or len(finished) >= refill_at)):
                for row in finished:
                    answers[row.index] = row.generated
                bar.update(len(finished))
                new = [queue.popleft() for _ in range(room)] if admit else []
                self._rebuild(
                    [self._prefill(prompt_ids, new[i : i + PREFILL_ROWS]) for i in range(0, len(new), PREFILL_ROWS)]
                )
            else:
                self._step()
        return answers

    def _forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        output = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_argument: cache},
            **self.logits_argument,
        )
        return output.logits[:, -1].argmax(dim=-1)

    def _new_cache(self, width: int, rows: int = 1):
        """A fresh cache holding the shared prefix for ``rows`` rows; checked to be filled by the forward
        pass that follows (``width`` new tokens)."""
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.model.config)
        if self.prefix_cache is not None:
            for index, layer in enumerate(self.prefix_cache.layers):
                cache.update(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1), index)
        return cache, cache.get_seq_length() + width

    def _encode_shared_prefix(self, prompt_ids: list[list[int]]) -> None:
        """Encode once the leading tokens every prompt shares (at least one token of each is left)."""
        if len(prompt_ids) < 2:
            return
        shared = 0
        first, shortest = prompt_ids[0], min(len(ids) for ids in prompt_ids)
        while shared < shortest - 1 and all(ids[shared] == first[shared] for ids in prompt_ids):
            shared += 1
        if not shared:
            return
        cache, expected = self._new_cache(shared)
        input_ids = torch.tensor([first[:shared]], device=self.device)
        self._forward(input_ids, torch.ones_like(input_ids), torch.arange(shared, device=self.device)[None], cache)
        if cache.get_seq_length() != expected:
            raise _CacheNotManaged
        self.prefix, self.prefix_cache = first[:shared], cache

    def _prefill(self, prompt_ids: list[list[int]], indices: list[int]) -> _Block:
        """Encode the prompts at ``indices`` after the shared prefix (left-padded among themselves)."""
        shared = len(self.prefix)
        suffixes = [prompt_ids[i][shared:] for i in indices]
        width = max(len(ids) for ids in suffixes)
        input_ids = torch.full((len(indices), width), self.pad_id, dtype=torch.long)
        suffix_mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, ids in enumerate(suffixes):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            suffix_mask[row, width - len(ids) :] = 1
        position_ids = shared + (suffix_mask.cumsum(-1) - 1).clamp(min=0)
        mask = torch.cat([torch.ones((len(indices), shared), dtype=torch.long), suffix_mask], dim=1).to(self.device)
        cache, expected = self._new_cache(width, rows=len(indices))
        first = self._forward(input_ids.to(self.device), mask, position_ids.to(self.device), cache)
        if cache.get_seq_length() != expected:
            raise _CacheNotManaged
        rows = [_Row(index, len(prompt_ids[index])) for index in indices]
        for row, token in zip(rows, first.tolist()):
            self._append(row, token, in_cache=False)
        return _Block(
            rows, [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers], mask, first
        )

    def _append(self, row: _Row, token: int, in_cache: bool = True) -> None:
        """Record ``token`` as the row's next answer token (``in_cache``: the token it was fed is now cached)."""
        row.generated.append(token)
        row.length += in_cache
        row.done = token in self.stops or len(row.generated) >= self.max_new_tokens

    def _rebuild(self, new_blocks: list[_Block]) -> None:
        """One preallocated cache for the unfinished rows and ``new_blocks``: right-aligned, columns no row
        attends to dropped, room for every remaining token."""
        from transformers.cache_utils import DynamicCache

        blocks = list(new_blocks)
        if self.batch is not None:
            keep = [position for position, row in enumerate(self.batch.rows) if not row.done]
            if keep:
                blocks.insert(0, self._select(keep))
        if not blocks:
            self.batch = self.cache = None
            return
        rows = [row for block in blocks for row in block.rows]
        width = max(block.mask.shape[1] for block in blocks)
        capacity = width + max(self.max_new_tokens - len(row.generated) for row in rows)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=self.device)
        layers = []
        for layer_index in range(len(blocks[0].keys)):
            buffers = []
            for part in ("keys", "values"):
                sources = [getattr(block, part)[layer_index] for block in blocks]
                _, heads, _, head_dim = sources[0].shape
                buffer = sources[0].new_zeros((len(rows), heads, capacity, head_dim))  # padding must be finite
                start = 0
                for source in sources:
                    buffer[start : start + source.shape[0], :, width - source.shape[2] : width] = source
                    start += source.shape[0]
                buffers.append(buffer)
            layers.append(self.layer_class(*buffers, length=width))
        start = 0
        for block in blocks:
            mask[start : start + len(block.rows), width - block.mask.shape[1] :] = block.mask
            start += len(block.rows)
        self.cache = DynamicCache()
        self.cache.layers = layers
        # The running batch's keys and values live in self.cache (they grow at every step).
        self.batch = _Block(rows, [], [], mask, torch.cat([block.next_tokens for block in blocks]))

    def _select(self, positions: list[int]) -> _Block:
        """The rows of the batch at ``positions``, without the leading columns none of them attends to."""
        index = torch.tensor(positions, dtype=torch.long, device=self.device)
        mask = self.batch.mask.index_select(0, index)
        first_column = int(mask.any(dim=0).long().argmax())
        return _Block(
            [self.batch.rows[p] for p in positions],
            [layer.keys[:, :, first_column:].index_select(0, index) for layer in self.cache.layers],
            [layer.values[:, :, first_column:].index_select(0, index) for layer in self.cache.layers],
            mask[:, first_column:],
            self.batch.next_tokens.index_select(0, index),
        )

    def _step(self) -> None:
        batch = self.batch
        live = torch.tensor([not row.done for row in batch.rows], dtype=torch.long, device=self.device)
        # A finished row's new column is masked and its position frozen: it computes, but changes nothing.
        batch.mask = torch.cat([batch.mask, live[:, None]], dim=1)
        positions = torch.tensor([[row.length] for row in batch.rows], dtype=torch.long, device=self.device)
        batch.next_tokens = self._forward(batch.next_tokens[:, None], batch.mask, positions, self.cache)
        for row, token in zip(batch.rows, batch.next_tokens.tolist()):
            if not row.done:
                self._append(row, token)


# ---------------------------------------------------------------------------------- static batches
def _decode_static_batches(model, prompt_ids, order, stops, max_new_tokens, batch_size, pad_id, bar):
    """Length-sorted static batches through ``model.generate`` (stops once every row of a batch stopped)."""
    device = next(model.parameters()).device
    answers: list[list[int]] = [[] for _ in prompt_ids]
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(prompt_ids[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            ids = prompt_ids[index]
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
            eos_token_id=sorted(stops),
        )
        for row, index in enumerate(batch):
            new = output[row, width:].tolist()
            stop = next((i for i, token in enumerate(new) if token in stops), None)
            answers[index] = new if stop is None else new[: stop + 1]
        bar.update(len(batch))
    return answers


# ---------------------------------------------------------------------------------- from embeddings
@torch.inference_mode()
def generate_token_ids_from_embeddings(
    model,
    tokenizer,
    prompt_embeddings: Sequence[torch.Tensor],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    progress: bool = False,
) -> list[list[int]]:
    """Greedy answers to prompts given as input embeddings, e.g. with a soft suffix (:mod:`sdd.attacks.embedding`).

    Such prompts have no token ids, so the continuous decoder (keyed by ids) does not apply: they are decoded
    in length-sorted, left-padded static batches by ``model.generate(inputs_embeds=...)``, greedy, with the
    stop tokens of :func:`stop_token_ids`.

    Args:
        model: a causal LM; put in eval mode for the call, its mode restored after.
        tokenizer: its tokenizer (for the stop and padding tokens).
        prompt_embeddings: per prompt, a ``(length, hidden size)`` tensor: the rendered prompt, generation
            prompt included, as the model's input embeddings.
        max_new_tokens: the most tokens generated per answer.
        batch_size: the most prompts decoded together.
        progress: show a progress bar.

    Returns:
        The generated token ids of each prompt, in input order, up to and including the first stop token
        (decode them with :func:`decode_answer`).
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(
            f"Generation needs max_new_tokens >= 1 and batch_size >= 1 (got {max_new_tokens}, "
            f"{batch_size}); fix the max_new_tokens / batch_size setting of the calling config."
        )
    stops = stop_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    parameter = next(model.parameters())
    order = sorted(range(len(prompt_embeddings)), key=lambda i: -prompt_embeddings[i].shape[0])
    answers: list[list[int]] = [[] for _ in prompt_embeddings]
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="Generating (embeddings)", disable=not progress):
            batch = order[start : start + batch_size]
            width = max(prompt_embeddings[i].shape[0] for i in batch)
            hidden = prompt_embeddings[batch[0]].shape[-1]
            embeddings = parameter.new_zeros((len(batch), width, hidden))  # padding must be finite
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long, device=parameter.device)
            for row, index in enumerate(batch):
                length = prompt_embeddings[index].shape[0]
                embeddings[row, width - length :] = prompt_embeddings[index].to(embeddings)
                attention_mask[row, width - length :] = 1
            output = model.generate(
                inputs_embeds=embeddings,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                use_cache=True,
                pad_token_id=pad_id,
                eos_token_id=stops,
            )
            for row, index in enumerate(batch):  # with inputs_embeds alone, generate returns the new tokens only
                new = output[row].tolist()
                stop = next((i for i, token in enumerate(new) if token in stops), None)
                answers[index] = new if stop is None else new[: stop + 1]
    finally:
        model.train(was_training)
    return answers
