"""The shared generation path: batched greedy decoding equals one-by-one decoding."""

from __future__ import annotations

from sdd.generation import generate


def test_batched_generation_matches_one_by_one(tiny_backbone, tiny_tokenizer):
    model = tiny_backbone.load_model()
    prompts = ["Hi", "How do I keep basil alive on a windowsill in winter?", "Name three planets please."]
    batched = generate(model, tiny_tokenizer, prompts, max_new_tokens=12, batch_size=3)
    single = [generate(model, tiny_tokenizer, [p], max_new_tokens=12, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(a, str) for a in batched)
