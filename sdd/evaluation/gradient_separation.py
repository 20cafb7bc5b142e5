"""Gradient separation: PCA of per-batch gradients on harmful and on benign data (SEAM's Figure 6).

Wang, Zhu and Wang (2025), "Self-Destructive Language Model" (arXiv:2505.12186), Figure 6: the
gradients of the fine-tuning loss on 100 harmful batches (BeaverTails) and 100 benign batches
(Alpaca), projected on their principal components (PC2 against PC3). On an undefended model the
two clouds overlap; SEAM pushes them apart (its objective lowers their cosine).

For each batch the gradient of the mean answer-token cross-entropy with respect to the selected
parameters is taken (model in ``eval()`` mode: no dropout), flattened, and optionally compressed
with a count sketch; the rows are centred and decomposed by SVD (PCA, in torch). Written:
``gradient_separation.png`` (the scatter), ``gradient_separation_points.csv`` (the PC scores of
every batch, to re-plot several models together) and the summary returned for ``results.json``:

- ``mean_cosine_harmful_benign``: mean cosine over all harmful x benign pairs of batch gradients;
  ``mean_cosine_within_harmful`` / ``..._within_benign``: over distinct pairs within a set;
  ``cosine_of_mean_gradients``: cosine of the two sets' mean gradients.
- ``explained_variance_ratio``: share of the variance of each of the first principal components.

Large models. A 7B model's gradient (28 GB in float32) cannot be kept per batch. Two knobs:
``param_regex`` keeps only parameters whose name matches (``re.search``; the others are frozen for
the computation, which also saves backward memory), and ``projection_dim`` compresses each gradient
with a seeded count sketch ``S`` (every coordinate is added, with a random sign, to one of
``projection_dim`` random buckets). ``E[<Sx, Sy>] = <x, y>`` and the error of an inner product has
standard deviation ``<= sqrt(2/projection_dim)·‖x‖·‖y‖``: cosines are preserved to about ±0.01 at
16,384 dimensions, and so is the geometry PCA sees. Bucket and sign are drawn per parameter name
and chunk from the seed (the same sketch for every batch, independent of which other parameters
are selected); they are drawn with the generator of the model's device, so a CPU and a GPU run
use different, equally valid, sketches. ``projection_dim=null`` keeps exact gradients (small
models or narrow regexes only).
"""

from __future__ import annotations

import csv
import logging
import re
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from sdd.chat import IGNORE_INDEX, PadCollator, instruction_answer, tokenize_conversation
from sdd.data.sources import DataSource, load_records
from sdd.losses import answer_cross_entropy

log = logging.getLogger(__name__)

MAX_DENSE_BYTES = 4 * 2**30  # exact gradients beyond this need projection_dim


class CountSketch:
    """A seeded count sketch of named tensors into ``dim`` float32 coordinates (a linear map).

    Args:
        dim: the sketch dimension.
        seed: fixes every bucket and sign.
        chunk_size: coordinates hashed at a time (bounds the temporary index memory).
    """

    def __init__(self, dim: int, seed: int = 0, chunk_size: int = 2**22) -> None:
        if dim < 1:
            raise ValueError(f"projection_dim must be a positive integer (or null for exact gradients), got {dim}.")
        self.dim, self.seed, self.chunk_size = int(dim), int(seed), int(chunk_size)

    def _buckets(self, name: str, chunk: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (self.seed * 1_000_003 + zlib.crc32(name.encode()) * 65_537 + chunk) % 2**63
        generator = torch.Generator(device=device).manual_seed(key)
        draw = torch.randint(0, 2 * self.dim, (length,), generator=generator, device=device)
        return draw % self.dim, 1.0 - 2.0 * (draw // self.dim).float()  # bucket, sign ±1

    def __call__(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> torch.Tensor:
        out = None
        for name, tensor in named_tensors:
            flat = tensor.detach().reshape(-1)
            if out is None:
                out = torch.zeros(self.dim, dtype=torch.float32, device=flat.device)
            for chunk, start in enumerate(range(0, flat.numel(), self.chunk_size)):
                values = flat[start : start + self.chunk_size].float()
                bucket, sign = self._buckets(name, chunk, values.numel(), flat.device)
                out.index_add_(0, bucket, values * sign)
        if out is None:
            raise ValueError("Nothing to sketch: no tensor given.")
        return out


def select_parameters(model: torch.nn.Module, param_regex: str | None) -> list[tuple[str, torch.nn.Parameter]]:
    """The named parameters whose name matches ``param_regex`` (all if None); fails if none does."""
    pattern = re.compile(param_regex) if param_regex else None
    named = [(n, p) for n, p in model.named_parameters() if pattern is None or pattern.search(n)]
    if not named:
        examples = [n for n, _ in list(model.named_parameters())[:5]]
        raise ValueError(
            f"eval.gradient_separation.param_regex={param_regex!r} matches no parameter; names look like {examples}."
        )
    return named


def batch_gradients(
    model: torch.nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    named_params: Sequence[tuple[str, torch.nn.Parameter]],
    sketch: CountSketch | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """One row per batch: the (sketched) gradient of its answer CE, on the CPU in float32; and the CEs.

    The model is put in eval mode with gradients only for ``named_params``; its mode and
    ``requires_grad`` flags are restored afterwards.
    """
    names = [n for n, _ in named_params]
    params = [p for _, p in named_params]
    selected = {id(p) for p in params}
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    device = params[0].device
    rows, losses = [], []
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(id(p) in selected)
        with torch.enable_grad():
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
                ).logits
                loss = answer_cross_entropy(logits, batch["labels"])
                grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
                if sketch is not None:
                    row = sketch(zip(names, grads))
                else:
                    row = torch.cat([g.detach().reshape(-1).float() for g in grads])
                rows.append(row.cpu())
                losses.append(loss.item())
                del grads
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return torch.stack(rows), losses


def pca(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, explained_variance_ratio)`` of the rows of ``matrix`` (centred, SVD, float64)."""
    centred = matrix.double() - matrix.double().mean(0, keepdim=True)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    variance = s.pow(2)
    return u * s, variance / variance.sum().clamp_min(1e-300)


def cosine_summary(harmful: torch.Tensor, benign: torch.Tensor) -> dict[str, float]:
    """Mean cosines between and within the two sets of gradient rows."""

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x.double() / x.double().norm(dim=1, keepdim=True).clamp_min(1e-300)

    h, b = unit(harmful), unit(benign)

    def within(x: torch.Tensor) -> float:
        n = x.shape[0]
        if n < 2:
            return float("nan")
        gram = x @ x.T
        return ((gram.sum() - gram.diagonal().sum()) / (n * (n - 1))).item()

    mean_h, mean_b = harmful.double().mean(0), benign.double().mean(0)
    return {
        "mean_cosine_harmful_benign": (h @ b.T).mean().item(),
        "mean_cosine_within_harmful": within(h),
        "mean_cosine_within_benign": within(b),
        "cosine_of_mean_gradients": (mean_h @ mean_b / (mean_h.norm() * mean_b.norm()).clamp_min(1e-300)).item(),
    }


def plot_separation(
    path: Path,
    harmful: torch.Tensor,
    benign: torch.Tensor,
    components: Sequence[int],
    explained: torch.Tensor,
    title: str | None = None,
) -> None:
    """Scatter of two principal components, harmful and benign batches in two colours."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    x, y = (c - 1 for c in components)
    figure = Figure(figsize=(4.8, 4.2), layout="constrained")
    axes = figure.add_subplot()
    axes.scatter(benign[:, x], benign[:, y], s=14, alpha=0.7, c="tab:blue", label=f"benign ({len(benign)})")
    axes.scatter(
        harmful[:, x], harmful[:, y], s=14, alpha=0.7, c="tab:red", marker="^", label=f"harmful ({len(harmful)})"
    )
    axes.set_xlabel(f"PC{components[0]} ({explained[x].item():.1%} of variance)")
    axes.set_ylabel(f"PC{components[1]} ({explained[y].item():.1%} of variance)")
    axes.set_title(title or "Per-batch gradients")
    axes.legend(frameon=False)
    figure.savefig(path, dpi=150)


def gradient_separation(
    model: torch.nn.Module,
    harmful_batches: Sequence[dict[str, torch.Tensor]],
    benign_batches: Sequence[dict[str, torch.Tensor]],
    output_dir: Path,
    components: Sequence[int] = (2, 3),
    param_regex: str | None = None,
    projection_dim: int | None = 16384,
    seed: int = 0,
    title: str | None = None,
) -> dict[str, Any]:
    """Gradients of every batch, their PCA scatter and cosine statistics (see the module docstring).

    Returns:
        The summary for ``results.json``; the PNG and CSV are written to ``output_dir``.
    """
    components = [int(c) for c in components]
    if len(components) != 2 or min(components) < 1:
        raise ValueError(
            f"eval.gradient_separation.components must be two 1-based component numbers, got {components}."
        )
    if not harmful_batches or not benign_batches:
        raise ValueError("Gradient separation needs at least one harmful and one benign batch.")
    named = select_parameters(model, param_regex)
    num_parameters = sum(p.numel() for _, p in named)
    rows = len(harmful_batches) + len(benign_batches)
    if projection_dim is None and rows * num_parameters * 4 > MAX_DENSE_BYTES:
        raise ValueError(
            f"Exact gradients of {num_parameters:,} parameters for {rows} batches need "
            f"{rows * num_parameters * 4 / 2**30:.1f} GiB: set eval.gradient_separation.projection_dim (e.g. 16384) "
            "or narrow eval.gradient_separation.param_regex."
        )
    sketch = CountSketch(projection_dim, seed) if projection_dim is not None else None
    harmful, harmful_ce = batch_gradients(model, harmful_batches, named, sketch)
    benign, benign_ce = batch_gradients(model, benign_batches, named, sketch)

    scores, explained = pca(torch.cat([harmful, benign]))
    if max(components) > scores.shape[1]:
        raise ValueError(
            f"Component {max(components)} requested but only {scores.shape[1]} exist for {rows} batches: "
            "lower eval.gradient_separation.components or add batches."
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    h_scores, b_scores = scores[: len(harmful)], scores[len(harmful) :]
    plot_path = output_dir / "gradient_separation.png"
    plot_separation(plot_path, h_scores, b_scores, components, explained, title)
    points_path = output_dir / "gradient_separation_points.csv"
    kept = min(scores.shape[1], max(10, max(components)))
    with open(points_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["set", "batch", "ce", *[f"pc{i + 1}" for i in range(kept)]])
        for label, block, ces in (("harmful", h_scores, harmful_ce), ("benign", b_scores, benign_ce)):
            for i, (row, ce) in enumerate(zip(block.tolist(), ces)):
                writer.writerow([label, i, f"{ce:.6g}", *[f"{v:.6g}" for v in row[:kept]]])

    return {
        **cosine_summary(harmful, benign),
        "explained_variance_ratio": [round(v, 6) for v in explained[:10].tolist()],
        "components": components,
        "num_harmful_batches": len(harmful),
        "num_benign_batches": len(benign),
        "harmful_ce": sum(harmful_ce) / len(harmful_ce),
        "benign_ce": sum(benign_ce) / len(benign_ce),
        "num_parameters": num_parameters,
        "param_regex": param_regex,
        "projection_dim": projection_dim,
        "plot": str(plot_path),
        "points": str(points_path),
    }


def load_batches(
    source: Any, tokenizer, num_batches: int, batch_size: int, max_length: int, seed: int, name: str
) -> list[dict[str, torch.Tensor]]:
    """``num_batches`` batches of an instruction-answer source, formatted by the project's chat path.

    A seeded random subset of ``num_batches * batch_size`` records (columns ``instruction``, ``answer``),
    tokenized and masked by :func:`sdd.chat.tokenize_conversation` (answer tokens only, cut at
    ``max_length``; examples with no answer token left are dropped), in a seeded random order.
    """
    records = load_records(DataSource.from_config(source, name), required=["instruction", "answer"])
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(records), generator=generator)[: num_batches * batch_size].tolist()
    examples = [
        tokenize_conversation(
            tokenizer, instruction_answer(str(records[i]["instruction"]), str(records[i]["answer"])), max_length
        )
        for i in sorted(chosen)
    ]
    examples = [e for e in examples if any(label != IGNORE_INDEX for label in e.labels)]
    order = torch.randperm(len(examples), generator=generator).tolist()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = PadCollator(pad_id)
    batches = [
        collate([examples[i] for i in order[start : start + batch_size]]) for start in range(0, len(order), batch_size)
    ][:num_batches]
    if len(batches) < num_batches:
        log.warning(
            "Gradient separation: %s gives %d batches of %d, not %d.", name, len(batches), batch_size, num_batches
        )
    return batches


def run_gradient_separation(model: torch.nn.Module, tokenizer, config, output_dir: Path) -> dict[str, Any]:
    """``gradient_separation`` on the batches described by ``eval.gradient_separation`` (conf/eval.yaml)."""
    seed = int(config.get("seed", 0))
    sizes = {
        "num_batches": int(config.num_batches),
        "batch_size": int(config.batch_size),
        "max_length": int(config.max_length),
        "seed": seed,
    }
    harmful = load_batches(config.harmful, tokenizer, name="eval.gradient_separation.harmful", **sizes)
    benign = load_batches(config.benign, tokenizer, name="eval.gradient_separation.benign", **sizes)
    return gradient_separation(
        model,
        harmful,
        benign,
        output_dir,
        components=list(config.components),
        param_regex=config.get("param_regex"),
        projection_dim=config.get("projection_dim"),
        seed=seed,
        title=config.get("title"),
    )
