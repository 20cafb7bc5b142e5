"""Cost of building the SDD pair set (``sdd.datamodules.SDDPairBuilder``) from the paper's real data, with
answers embedded as they are drawn and the shared embedding cache, against references of the same run.

Data (``corpus=local``, see ``conf/corpus/local.yaml``): harmful instructions from the BeaverTails 14-category
sample, answers from the train part of Alpaca (9k) and LIMA (1k). Three builds, one process, one encoder
(all-MiniLM-L6-v2, one text per forward pass as configured), each in its own temporary pair-set folder:

1. ``small``: ``--small-pairs`` (400) pairs, seed 0, with an empty embedding cache of its own.
2. ``first``: ``--num-pairs`` (8,000) pairs, seed 0, with another empty embedding cache. Its first draws
   cover most of the answer pool, so it embeds the whole pool in one call (``embed_whole_pool_above``):
   that call's time is the full-pool embedding time, the reference of target 1.
3. ``second``: ``--num-pairs`` pairs, seed 1, with the cache the first build filled.

Targets: ``small`` <= 10% of the full-pool embedding time; ``second`` <= 5% of ``first``. Each build's
time is its wall time, the encoder's loading from disk included when the build loads it (the library
import is done once before); loading alone is reported too. A last check rebuilds ``first``'s
configuration from the cache into a new folder and compares the pairs (cached vs cold: identical).

    .venv/bin/python benchmarks/sdd_pair_build.py                       # ../shared/data, ~11 min on 1 thread
    .venv/bin/python benchmarks/sdd_pair_build.py --data-dir /data --num-pairs 2000 --small-pairs 200
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_arguments, compose, machine, print_table, set_threads, write_results

NAME = "sdd_pair_build"
TARGETS = {"small_vs_full_pool_embedding": 0.10, "second_vs_first": 0.05}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("../shared/data"),
        help="folder laid out as conf/corpus/local.yaml says (default: %(default)s)",
    )
    parser.add_argument("--num-pairs", type=int, default=8000, help="pairs of the first and second builds")
    parser.add_argument("--small-pairs", type=int, default=400, help="pairs of the small build")
    add_common_arguments(parser, NAME)
    args = parser.parse_args(argv)
    if min(args.num_pairs, args.small_pairs) < 1:
        parser.error("--num-pairs and --small-pairs must be at least 1")
    return args


def required_files(cfg) -> list[Path]:
    sources = [cfg.data.builder.harmful, *cfg.data.builder.answers.values()]
    return [Path(str(source.path)) for source in sources]


class TimedEncoder:
    """The builder's encoder, recording the size and wall time of every call (its loading included)."""

    def __init__(self, encoder) -> None:
        self.encoder = encoder
        self.calls: list[dict[str, float]] = []

    @property
    def identity(self) -> str:
        return self.encoder.identity

    @property
    def load_seconds(self) -> float:
        return self.encoder.load_seconds

    def __call__(self, texts):
        loaded_before = self.encoder.load_seconds
        started = time.perf_counter()
        vectors = self.encoder(texts)
        seconds = time.perf_counter() - started
        load = self.encoder.load_seconds - loaded_before
        self.calls.append({"texts": len(texts), "seconds": round(seconds - load, 3), "load_seconds": round(load, 3)})
        return vectors


def run_build(args, data_dir: Path, folder: Path, num_pairs: int, seed: int, embedding_cache: Path) -> dict[str, Any]:
    from hydra.utils import instantiate

    from sdd.embeddings import SentenceEncoder

    cfg = compose(
        [
            "corpus=local",
            f"paths.data_dir={data_dir}",
            f"data.num_examples={num_pairs}",
            f"seed={seed}",
            f"data.builder.cache_dir={folder}/sdd_pairs",
            f"data.builder.embedding_cache={embedding_cache}",
            f"paths.output_dir={folder}",
            *args.override,
        ]
    )
    missing = [path for path in required_files(cfg) if not path.is_file()]
    if missing:
        raise SystemExit(
            f"The SDD data is not under {data_dir}: missing {', '.join(str(p) for p in missing)}. Fix: pass "
            "--data-dir <folder> laid out as conf/corpus/local.yaml says (beavertails/, alpaca/, lima/)."
        )
    builder = instantiate(cfg.data.builder)
    assert not builder.output_dir().exists()  # a new pair-set folder: the set is built, not reused
    encoder = TimedEncoder(SentenceEncoder(builder.encoder, builder.encoder_batch_size))  # loads on first use
    started = time.perf_counter()
    pairs, manifest = builder.build(encoder)
    seconds = time.perf_counter() - started
    return {
        "pairs": pairs,
        "manifest": manifest,
        "seconds": seconds,
        "encoder_load_seconds": encoder.load_seconds,
        "encoder_calls": encoder.calls,
        "builder": builder,
    }


def summary(build: dict[str, Any]) -> dict[str, Any]:
    manifest = build["manifest"]
    return {
        "num_pairs": manifest["num_pairs"],
        "seed": manifest["seed"],
        "seconds": round(build["seconds"], 3),
        "encoder_load_seconds": round(build["encoder_load_seconds"], 3),
        "seconds_without_encoder_load": round(build["seconds"] - build["encoder_load_seconds"], 3),
        "phase_seconds": manifest["phase_seconds"],
        "embedding": manifest["embedding"],
        "encoder_calls": build["encoder_calls"],
        "resamples": manifest["resamples"],
        "fallbacks": manifest["fallbacks"],
        "similarity_max": manifest["similarity"]["max"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import sentence_transformers  # noqa: F401  (the library import, once, outside the timings)
    import torch

    data_dir = args.data_dir.expanduser().resolve()
    set_threads(args.threads)
    info = machine()
    with tempfile.TemporaryDirectory(prefix="sdd-bench-") as tmp:
        tmp = Path(tmp)
        small = run_build(args, data_dir, tmp / "small", args.small_pairs, 0, tmp / "small_embeddings.sqlite")
        first = run_build(args, data_dir, tmp / "first", args.num_pairs, 0, tmp / "embeddings.sqlite")
        second = run_build(args, data_dir, tmp / "second", args.num_pairs, 1, tmp / "embeddings.sqlite")
        again = run_build(args, data_dir, tmp / "again", args.num_pairs, 0, tmp / "embeddings.sqlite")

    pool = first["manifest"]["answers_available"]
    pool_calls = [call for call in first["encoder_calls"] if call["texts"] == pool]
    if not pool_calls:
        raise SystemExit(
            f"The first build did not embed the whole pool of {pool} answers in one call (its calls: "
            f"{first['encoder_calls']}): raise --num-pairs or data.builder.embed_whole_pool_above."
        )
    full_pool_seconds = pool_calls[0]["seconds"]
    ratios = {
        "small_vs_full_pool_embedding": small["seconds"] / full_pool_seconds,
        "small_without_encoder_load_vs_full_pool_embedding": (small["seconds"] - small["encoder_load_seconds"])
        / full_pool_seconds,
        "second_vs_first": second["seconds"] / first["seconds"],
    }
    results = {
        "benchmark": NAME,
        "description": "SDDPairBuilder with answers embedded as drawn and the shared embedding cache: a small "
        "build vs the full-pool embedding time, and a second build (another seed, warm cache) vs "
        "the first, in one run",
        "settings": {
            "data_dir": str(data_dir),
            "num_pairs": args.num_pairs,
            "small_pairs": args.small_pairs,
            "encoder": first["builder"].encoder,
            "encoder_batch_size": first["builder"].encoder_batch_size,
            "embed_whole_pool_above": first["builder"].embed_whole_pool_above,
            "torch_threads": torch.get_num_threads(),
            "overrides": args.override,
        },
        "answers_in_pool": pool,
        "harmful_instructions_available": first["manifest"]["harmful_instructions_available"],
        "full_pool_embedding_seconds": full_pool_seconds,
        "full_pool_texts_embedded_per_second": pool / full_pool_seconds,
        "builds": {
            "small": summary(small),
            "first": summary(first),
            "second": summary(second),
            "first_again_from_cache": summary(again),
        },
        "cached_rebuild_identical": again["pairs"] == first["pairs"],
        "ratios": ratios,
        "targets": {
            name: {"limit": limit, "measured": ratios[name], "met": ratios[name] <= limit}
            for name, limit in TARGETS.items()
        },
        "machine": info,
    }

    print(
        f"\nSDD pair builds from {data_dir}: {pool:,} answers in the pool, "
        f"{results['harmful_instructions_available']} harmful instructions"
    )
    rows = []
    for name, build in (("small", small), ("first", first), ("second", second), ("first, from cache", again)):
        counts = build["manifest"]["embedding"]
        rows.append(
            [
                name,
                build["manifest"]["num_pairs"],
                build["manifest"]["seed"],
                build["seconds"],
                build["encoder_load_seconds"],
                counts["texts_embedded"],
                counts["texts_from_cache"],
                counts["answers_used"],
                "yes" if counts["whole_pool"] else "no",
            ]
        )
    print_table(
        ["build", "pairs", "seed", "seconds", "encoder load", "embedded", "from cache", "answers used", "whole pool"],
        rows,
    )
    print(
        f"\nfull-pool embedding (first build, one call of {pool:,} answers): {full_pool_seconds:,.1f} s "
        f"({pool / full_pool_seconds:.1f} texts/s)"
    )
    for name, target in results["targets"].items():
        print(f"{name}: {target['measured']:.4f} (target <= {target['limit']}: {'met' if target['met'] else 'MISSED'})")
    print(
        f"small build without the encoder's loading: {ratios['small_without_encoder_load_vs_full_pool_embedding']:.4f}"
        f"; cached rebuild identical to the cold one: {results['cached_rebuild_identical']}"
    )
    write_results(args.output, results)
    return results


if __name__ == "__main__":
    main()
