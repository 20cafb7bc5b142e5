"""Generation throughput of ``sdd.generation.generate``: batched (left padding, KV cache) against one
prompt at a time, greedy, on the same prompts (the corpus's harmful instructions; the demo ones by
default) and the same ``max_new_tokens``.

Generated tokens are counted from the model's output, per row up to and including its first stop token
(end of turn / EOS), so a batch that keeps decoding rows that already stopped gets no credit for them. Greedy
answers should not depend on the batch size; any answer that differs between the two runs is counted
(left padding changes fp32 rounding, which can flip a near-tie).

    .venv/bin/python benchmarks/generation_throughput.py                        # SmolLM2-135M-Instruct
    .venv/bin/python benchmarks/generation_throughput.py --backbone tiny_llama  # seconds
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

NAME = "generation_throughput"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="smollm2_135m_instruct", help="a conf/backbone option")
    parser.add_argument("--batch-size", type=int, default=16, help="the batched run's batch size")
    parser.add_argument("--num-prompts", type=int, default=64, help="the first N harmful instructions (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    add_common_arguments(parser, NAME)
    args = parser.parse_args(argv)
    if args.batch_size < 2 or args.max_new_tokens < 1 or args.num_prompts < 0:
        parser.error("--batch-size must be at least 2, --max-new-tokens at least 1, --num-prompts >= 0")
    return args


class GeneratedTokenCounter:
    """Counts the tokens ``model.generate`` produces, per row up to and including the first stop token.

    Wraps the model's ``generate`` on this instance only, so ``sdd.generation.generate`` runs unchanged.
    """

    def __init__(self, model) -> None:
        self.count = 0
        original = model.generate

        def counting_generate(*args, **kwargs):
            output = original(*args, **kwargs)
            new_tokens = output[:, kwargs["input_ids"].shape[1] :]
            stops = kwargs.get("eos_token_id") or []
            stops = stops if isinstance(stops, (list, tuple)) else [stops]
            for row in new_tokens.tolist():
                stop = next((i for i, token in enumerate(row) if token in stops), None)
                self.count += len(row) if stop is None else stop + 1
            return output

        model.generate = counting_generate


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch
    from hydra.utils import instantiate

    from sdd.data.sources import load_records
    from sdd.generation import generate

    set_threads(args.threads)
    info = machine()
    with tempfile.TemporaryDirectory(prefix="sdd-bench-") as tmp:
        cfg = compose([f"backbone={args.backbone}", f"paths.output_dir={tmp}", *args.override])
    backbone = instantiate(cfg.backbone)
    tokenizer = backbone.load_tokenizer()
    model = backbone.load_model()
    records = load_records(cfg.corpus.harmful, required=["instruction"])
    prompts = [str(r["instruction"]) for r in records]
    prompts = prompts[: args.num_prompts] if args.num_prompts else prompts

    counter = GeneratedTokenCounter(model)

    def timed(batch_size: int) -> tuple[list[str], float]:
        counter.count = 0
        started = time.perf_counter()
        answers = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=batch_size)
        return answers, time.perf_counter() - started, counter.count

    # Warm both code paths up (allocator, first-call overheads) before timing.
    generate(model, tokenizer, prompts[:2], max_new_tokens=4, batch_size=2)
    generate(model, tokenizer, prompts[:1], max_new_tokens=4, batch_size=1)
    print(f"{len(prompts)} prompts, max_new_tokens={args.max_new_tokens}: one at a time ...", flush=True)
    sequential, sequential_seconds, sequential_tokens = timed(1)
    print(f"batch {args.batch_size} ...", flush=True)
    batched, batched_seconds, batched_tokens = timed(args.batch_size)

    mismatches = [i for i, (a, b) in enumerate(zip(sequential, batched)) if a != b]
    runs = {
        "batch_1": {"batch_size": 1, "seconds": sequential_seconds, "generated_tokens": sequential_tokens},
        f"batch_{args.batch_size}": {"batch_size": args.batch_size, "seconds": batched_seconds,
                                     "generated_tokens": batched_tokens},
    }
    for run in runs.values():
        run["tokens_per_second"] = run["generated_tokens"] / run["seconds"]
        run["prompts_per_second"] = len(prompts) / run["seconds"]
    batched_run = runs[f"batch_{args.batch_size}"]
    results = {
        "benchmark": NAME,
        "description": "sdd.generation.generate: batched vs one prompt at a time, greedy",
        "settings": {"backbone": args.backbone, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
                     "prompt_source": cfg.corpus.harmful.name + " (" + str(cfg.corpus.harmful.path) + ")",
                     "dtype": backbone.dtype, "torch_threads": torch.get_num_threads(), "overrides": args.override},
        "runs": runs,
        "speedup_batched_over_batch_1": batched_run["tokens_per_second"] / runs["batch_1"]["tokens_per_second"],
        "wall_time_ratio_batch_1_over_batched": sequential_seconds / batched_seconds,
        "mismatched_answers": len(mismatches),
        "mismatched_indices": mismatches,
        "examples": [{"prompt": prompts[i], "batch_1": sequential[i], "batched": batched[i]} for i in mismatches[:3]],
        "machine": info,
    }

    print(f"\nGeneration throughput, {args.backbone}, {len(prompts)} prompts, greedy, "
          f"max_new_tokens={args.max_new_tokens}")
    print_table(["run", "batch", "seconds", "generated tokens", "tokens/s", "prompts/s"],
                [[name, r["batch_size"], r["seconds"], r["generated_tokens"], r["tokens_per_second"],
                  r["prompts_per_second"]] for name, r in runs.items()])
    print(f"speed-up batched / one at a time (tokens/s): {results['speedup_batched_over_batch_1']:.2f}")
    print(f"answers that differ between the two runs: {len(mismatches)} of {len(prompts)}")
    write_results(args.output, results)
    return results


if __name__ == "__main__":
    main()
