"""Gradient separation (SEAM's Figure 6): the count sketch, the statistics and evaluate.py's block."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_config

from sdd.evaluation.gradient_separation import (
    CountSketch,
    batch_gradients,
    cosine_summary,
    pca,
    select_parameters,
)
from sdd.evaluation.run import evaluate


def test_count_sketch_preserves_inner_products():
    generator = torch.Generator().manual_seed(0)
    x = {"a.weight": torch.randn(300, 100, generator=generator), "b.bias": torch.randn(20_000, generator=generator)}
    # y correlated with x (cosine about 0.45), as gradients of related batches are.
    y = {k: 0.5 * v + torch.randn(v.shape, generator=generator) for k, v in x.items()}
    sketch = CountSketch(dim=4096, seed=3, chunk_size=7_000)  # small chunks: the chunked path is used
    sx, sy = sketch(x.items()), sketch(y.items())
    flat_x = torch.cat([v.reshape(-1) for v in x.values()])
    flat_y = torch.cat([v.reshape(-1) for v in y.values()])
    scale = (flat_x.norm() * flat_y.norm()).item()
    # Error std <= sqrt(2/4096) = 0.022 of |x||y|; 0.08 is over 3.5 std.
    assert abs((sx @ sy).item() - (flat_x @ flat_y).item()) < 0.08 * scale
    assert sx.norm().item() == pytest.approx(flat_x.norm().item(), rel=0.08)
    exact_cosine = (flat_x @ flat_y / scale).item()
    assert (sx @ sy / (sx.norm() * sy.norm())).item() == pytest.approx(exact_cosine, abs=0.05)
    # Linear, deterministic under its seed, a different map under another seed.
    assert torch.allclose(sketch({k: 2 * v + y[k] for k, v in x.items()}.items()), 2 * sx + sy, atol=1e-3)
    assert torch.equal(CountSketch(4096, seed=3, chunk_size=7_000)(x.items()), sx)
    assert not torch.allclose(CountSketch(4096, seed=4)(x.items()), sx)


def test_statistics_on_known_vectors():
    harmful = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    benign = torch.tensor([[-1.0, 0.0], [0.0, 3.0]])
    stats = cosine_summary(harmful, benign)
    assert stats["mean_cosine_harmful_benign"] == pytest.approx((-1 + 0 - 1 + 0) / 4)
    assert stats["mean_cosine_within_harmful"] == pytest.approx(1.0)
    assert stats["mean_cosine_within_benign"] == pytest.approx(0.0)
    scores, explained = pca(torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 1.0], [4.0, 1.0]]))
    assert explained.tolist() == pytest.approx([16 / 17, 1 / 17])
    assert scores[:, 0].abs().tolist() == pytest.approx([2.0] * 4)


def test_gradients_are_exact_without_projection_and_state_is_restored(tiny_backbone, tiny_tokenizer):
    from sdd.evaluation.gradient_separation import load_batches

    model = tiny_backbone.load_model()
    model.train()
    model.model.embed_tokens.weight.requires_grad_(False)
    source = compose_config("eval", ["model=x"]).corpus.benign
    batches = load_batches(source, tiny_tokenizer, num_batches=2, batch_size=2, max_length=64, seed=0, name="benign")
    named = select_parameters(model, r"layers\.1\.")
    assert named and all("layers.1." in n for n, _ in named)
    rows, losses = batch_gradients(model, batches, named)
    assert rows.shape == (2, sum(p.numel() for _, p in named))
    # The same gradient by plain backward in eval mode.
    model.eval()
    output = model(
        input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"], labels=batches[0]["labels"]
    )
    output.loss.backward()
    expected = torch.cat([p.grad.reshape(-1) for _, p in named])
    assert torch.allclose(rows[0], expected, atol=1e-6)
    assert losses[0] == pytest.approx(output.loss.item(), rel=1e-5)
    with pytest.raises(ValueError, match="matches no parameter"):
        select_parameters(model, "no_such_layer")


def test_restores_mode_and_flags(tiny_backbone, tiny_tokenizer):
    from sdd.evaluation.gradient_separation import load_batches

    model = tiny_backbone.load_model()
    model.train()
    model.model.embed_tokens.weight.requires_grad_(False)
    source = compose_config("eval", ["model=x"]).corpus.benign
    batches = load_batches(source, tiny_tokenizer, num_batches=1, batch_size=2, max_length=64, seed=0, name="benign")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    batch_gradients(model, batches, select_parameters(model, r"layers\.0\."), CountSketch(64))
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_evaluate_writes_the_plot_and_the_cosines(tmp_path, cache_dir, tiny_backbone):
    cfg = compose_config(
        "eval",
        [
            f"model={tiny_backbone.resolve()}",
            "eval.harmfulness.enabled=false",
            "eval.judges.refusal.enabled=false",
            "eval.judges.relevance.enabled=false",
            "eval.gradient_separation.enabled=true",
            "eval.gradient_separation.num_batches=4",
            "eval.gradient_separation.batch_size=2",
            "eval.gradient_separation.max_length=64",
            "eval.gradient_separation.projection_dim=2048",
        ],
        output_dir=tmp_path / "eval",
        cache_dir=cache_dir,
    )
    evaluate(cfg)
    output_dir = Path(cfg.paths.output_dir)
    saved = json.loads((output_dir / "results.json").read_text())["gradient_separation"]
    png = output_dir / "gradient_separation.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000
    for key in ("mean_cosine_harmful_benign", "mean_cosine_within_harmful", "mean_cosine_within_benign"):
        assert -1 <= saved[key] <= 1
    assert saved["num_harmful_batches"] == saved["num_benign_batches"] == 4
    assert saved["components"] == [2, 3] and saved["projection_dim"] == 2048
    assert sum(saved["explained_variance_ratio"]) == pytest.approx(1.0, abs=1e-6)  # 8 rows: every component is listed
    lines = (output_dir / "gradient_separation_points.csv").read_text().splitlines()
    assert len(lines) == 1 + 8 and lines[0].startswith("set,batch,ce,pc1")
