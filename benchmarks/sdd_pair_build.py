"""Time to build the SDD pair set (``sdd.datamodules.SDDPairBuilder``) from the paper's real data, in a
fresh cache folder (nothing reused).

Data (``corpus=local``, see ``conf/corpus/local.yaml``): harmful instructions from the BeaverTails 14-category
sample, answers from Alpaca (9k) and LIMA (1k). The wall time is split into: loading the sentence encoder
(all-MiniLM-L6-v2), loading (read, dedupe and balanced sampling of the sources), embedding (every
distinct text once), matching (the random draws and the similarity check), and writing the set; the
three middle phases are the builder's own ``manifest["phase_seconds"]``.

    .venv/bin/python benchmarks/sdd_pair_build.py                       # 8,000 pairs from ../shared/data
    .venv/bin/python benchmarks/sdd_pair_build.py --data-dir /data --num-pairs 2000
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"),
                        help="folder laid out as conf/corpus/local.yaml says (default: %(default)s)")
    parser.add_argument("--num-pairs", type=int, default=8000)
    add_common_arguments(parser, NAME)
    args = parser.parse_args(argv)
    if args.num_pairs < 1:
        parser.error("--num-pairs must be at least 1")
    return args


def required_files(cfg) -> list[Path]:
    sources = [cfg.data.builder.harmful, *cfg.data.builder.answers.values()]
    return [Path(str(source.path)) for source in sources]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch
    from hydra.utils import instantiate

    from sdd.datamodules.sdd_pairs import sentence_embedder

    data_dir = args.data_dir.expanduser().resolve()
    set_threads(args.threads)
    info = machine()
    with tempfile.TemporaryDirectory(prefix="sdd-bench-") as tmp:
        cfg = compose([
            "corpus=local", f"paths.data_dir={data_dir}", f"data.num_examples={args.num_pairs}",
            f"data.builder.cache_dir={tmp}/sdd_pairs", f"paths.output_dir={tmp}", *args.override,
        ])
        missing = [path for path in required_files(cfg) if not path.is_file()]
        if missing:
            raise SystemExit(
                f"The SDD data is not under {data_dir}: missing {', '.join(str(p) for p in missing)}. Fix: pass "
                "--data-dir <folder> laid out as conf/corpus/local.yaml says (beavertails/, alpaca/, lima/)."
            )
        builder = instantiate(cfg.data.builder)
        assert not builder.output_dir().exists()  # a fresh cache: nothing is reused

        started = time.perf_counter()
        embed = sentence_embedder(builder.encoder, builder.encoder_batch_size)
        encoder_seconds = time.perf_counter() - started
        embedded = {"calls": 0, "texts": 0}

        def counting_embed(texts):
            embedded["calls"] += 1
            embedded["texts"] += len(texts)
            return embed(texts)

        started = time.perf_counter()
        pairs, manifest = builder.build(counting_embed)
        build_seconds = time.perf_counter() - started

    phases = manifest["phase_seconds"]
    seconds = {"encoder_load": encoder_seconds, **phases,
               "write": build_seconds - sum(phases.values()), "total": encoder_seconds + build_seconds}
    similarity = {k: v for k, v in manifest["similarity"].items() if k != "histogram"}
    statistics = {
        key: manifest[key]
        for key in ("num_pairs", "harmful_instructions_available", "answers_available", "answers_per_source",
                    "rows_per_category", "repeated_instructions", "resamples", "pairs_resampled", "fallbacks",
                    "threshold", "max_tries")
    }
    results = {
        "benchmark": NAME,
        "description": "SDDPairBuilder: build the SDD pair set from the real data, fresh cache",
        "settings": {"data_dir": str(data_dir), "num_pairs": args.num_pairs, "encoder": builder.encoder,
                     "encoder_batch_size": builder.encoder_batch_size, "torch_threads": torch.get_num_threads(),
                     "overrides": args.override},
        "seconds": seconds,
        "texts_embedded": embedded["texts"],
        "embed_calls": embedded["calls"],
        "pairs_per_second": len(pairs) / build_seconds,
        "pairs_per_second_with_encoder_load": len(pairs) / seconds["total"],
        "texts_embedded_per_second": embedded["texts"] / phases["embed"],
        "manifest": {**statistics, "similarity": similarity},
        "machine": info,
    }

    print(f"\nSDD pair build: {len(pairs):,} pairs from {data_dir}")
    print_table(["phase", "seconds", "share"],
                [[phase, value, f"{100 * value / seconds['total']:.1f}%"] for phase, value in seconds.items()])
    print(f"throughput: {results['pairs_per_second']:,.1f} pairs/s (build), "
          f"{results['texts_embedded_per_second']:,.1f} texts embedded/s ({embedded['texts']:,} texts, "
          f"{embedded['calls']} calls)")
    print(f"\nharmful instructions available: {manifest['harmful_instructions_available']}, answers available: "
          f"{manifest['answers_available']:,} {manifest['answers_per_source']}")
    print(f"repeated instructions: {manifest['repeated_instructions']:,}, resamples: {manifest['resamples']:,} "
          f"({manifest['pairs_resampled']:,} pairs resampled), fallbacks: {manifest['fallbacks']}")
    print(f"similarity: mean {similarity['mean']:.3f}, max {similarity['max']:.3f}, "
          f"above threshold {similarity['above_threshold']} (threshold {manifest['threshold']})")
    print_table(["category", "pairs"], [[c, n] for c, n in manifest["rows_per_category"].items()])
    write_results(args.output, results)
    return results


if __name__ == "__main__":
    main()
