"""Generation throughput of ``sdd.generation``: batched against one prompt at a time, greedy, on the same
prompts (the corpus's harmful instructions; the demo ones by default), the same ``max_new_tokens`` and the
same torch thread count.

Each arm calls ``generate_token_ids`` and decodes the answers, which is all ``generate`` does. Generated
tokens are the ids it returns: per prompt up to and including its stop token (end of turn / EOS), so
nothing decoded after an answer ended counts.

The two arms are interleaved, so that a change in the load of a shared machine hits both: in each of
``--rounds`` rounds the batched arm answers every prompt and the one-by-one arm a 1/rounds share of them
(prompts r, r + rounds, ...), alternating which arm goes first. Over the run the one-by-one arm answers
every prompt once, the batched arm every prompt once per round. Each round's ratio of tokens/s is
reported, and the overall one (total tokens over total seconds, per arm). Greedy answers should not
depend on the batch size; every batched answer is compared with the one-by-one answer to the same
prompt (left padding changes fp32 rounding, which can flip a near-tie), and the batched rounds with
each other.

    .venv/bin/python benchmarks/generation_throughput.py                        # SmolLM2-135M-Instruct
    .venv/bin/python benchmarks/generation_throughput.py --backbone tiny_llama  # seconds
"""

from __future__ import annotations

import argparse
import statistics
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
    parser.add_argument("--batch-size", type=int, default=64, help="the batched arm's batch size")
    parser.add_argument("--num-prompts", type=int, default=64, help="the first N harmful instructions (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="interleaved rounds; the one-by-one arm answers 1/rounds of the prompts in each",
    )
    add_common_arguments(parser, NAME)
    args = parser.parse_args(argv)
    if args.batch_size < 2 or args.max_new_tokens < 1 or args.num_prompts < 0 or args.rounds < 1:
        parser.error("--batch-size must be at least 2, --max-new-tokens and --rounds at least 1, --num-prompts >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch
    from hydra.utils import instantiate

    from sdd.data.sources import load_records
    from sdd.generation import decode_answer, generate_token_ids, stop_token_ids

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
    if len(prompts) < args.rounds:
        raise SystemExit(f"--rounds {args.rounds} needs at least as many prompts (got {len(prompts)})")
    stops = stop_token_ids(tokenizer, model)

    def timed(indices: list[int], batch_size: int) -> tuple[dict[int, str], dict[str, Any]]:
        started = time.perf_counter()
        token_ids = generate_token_ids(
            model, tokenizer, [prompts[i] for i in indices], max_new_tokens=args.max_new_tokens, batch_size=batch_size
        )
        answers = {i: decode_answer(tokenizer, ids, stops) for i, ids in zip(indices, token_ids)}
        seconds = time.perf_counter() - started
        tokens = sum(len(ids) for ids in token_ids)
        return answers, {
            "prompts": len(indices),
            "seconds": seconds,
            "generated_tokens": tokens,
            "tokens_per_second": tokens / seconds,
        }

    # Warm both code paths up (allocator, first-call overheads) before timing.
    generate_token_ids(model, tokenizer, prompts[:2], max_new_tokens=4, batch_size=2)
    generate_token_ids(model, tokenizer, prompts[:1], max_new_tokens=4, batch_size=1)
    everything = list(range(len(prompts)))
    one_by_one: dict[int, str] = {}
    batched_rounds: list[dict[int, str]] = []
    rounds = []
    for r in range(args.rounds):
        share = everything[r :: args.rounds]
        arms = [("one_by_one", share, 1), ("batched", everything, args.batch_size)]
        figures = {}
        for arm, indices, batch_size in arms if r % 2 == 0 else arms[::-1]:
            print(f"round {r + 1}/{args.rounds}: {arm}, {len(indices)} prompts ...", flush=True)
            answers, figures[arm] = timed(indices, batch_size)
            if arm == "one_by_one":
                one_by_one.update(answers)
            else:
                batched_rounds.append(answers)
        first = "one_by_one" if r % 2 == 0 else "batched"
        rounds.append(
            {
                "round": r + 1,
                "first": first,
                **figures,
                "speedup": figures["batched"]["tokens_per_second"] / figures["one_by_one"]["tokens_per_second"],
            }
        )

    def total(arm: str, batch_size: int) -> dict[str, Any]:
        seconds = sum(r[arm]["seconds"] for r in rounds)
        tokens = sum(r[arm]["generated_tokens"] for r in rounds)
        answered = sum(r[arm]["prompts"] for r in rounds)
        return {
            "batch_size": batch_size,
            "prompts_answered": answered,
            "seconds": seconds,
            "generated_tokens": tokens,
            "tokens_per_second": tokens / seconds,
            "prompts_per_second": answered / seconds,
        }

    runs = {"batch_1": total("one_by_one", 1), f"batch_{args.batch_size}": total("batched", args.batch_size)}
    mismatches = sorted({i for answers in batched_rounds for i in everything if answers[i] != one_by_one[i]})
    rounds_disagree = sorted(
        {i for answers in batched_rounds[1:] for i in everything if answers[i] != batched_rounds[0][i]}
    )
    speedups = [r["speedup"] for r in rounds]
    results = {
        "benchmark": NAME,
        "description": "sdd.generation: batched vs one prompt at a time, greedy, interleaved rounds",
        "settings": {
            "backbone": args.backbone,
            "prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size,
            "rounds": args.rounds,
            "stop_tokens": tokenizer.convert_ids_to_tokens(stops),
            "prompt_source": cfg.corpus.harmful.name + " (" + str(cfg.corpus.harmful.path) + ")",
            "dtype": backbone.dtype,
            "torch_threads": torch.get_num_threads(),
            "overrides": args.override,
        },
        "rounds": rounds,
        "runs": runs,
        "speedup_batched_over_batch_1": runs[f"batch_{args.batch_size}"]["tokens_per_second"]
        / runs["batch_1"]["tokens_per_second"],
        "speedup_per_round": speedups,
        "speedup_median_round": statistics.median(speedups),
        "mismatched_answers": len(mismatches),
        "mismatched_indices": mismatches,
        "batched_rounds_disagree": len(rounds_disagree),
        "examples": [
            {"prompt": prompts[i], "batch_1": one_by_one[i], "batched": batched_rounds[0][i]} for i in mismatches[:3]
        ],
        "machine": info,
    }

    print(
        f"\nGeneration throughput, {args.backbone}, {len(prompts)} prompts, greedy, "
        f"max_new_tokens={args.max_new_tokens}, batch {args.batch_size}, {args.rounds} interleaved rounds"
    )
    print_table(
        [
            "round",
            "first",
            "1-by-1 prompts",
            "1-by-1 s",
            "1-by-1 tok/s",
            "batched prompts",
            "batched s",
            "batched tok/s",
            "speed-up",
        ],
        [
            [
                r["round"],
                r["first"],
                r["one_by_one"]["prompts"],
                r["one_by_one"]["seconds"],
                r["one_by_one"]["tokens_per_second"],
                r["batched"]["prompts"],
                r["batched"]["seconds"],
                r["batched"]["tokens_per_second"],
                r["speedup"],
            ]
            for r in rounds
        ],
    )
    print()
    print_table(
        ["run", "batch", "prompts answered", "seconds", "generated tokens", "tokens/s", "prompts/s"],
        [
            [
                name,
                r["batch_size"],
                r["prompts_answered"],
                r["seconds"],
                r["generated_tokens"],
                r["tokens_per_second"],
                r["prompts_per_second"],
            ]
            for name, r in runs.items()
        ],
    )
    print(
        f"speed-up batched / one at a time (tokens/s, all rounds): {results['speedup_batched_over_batch_1']:.2f} "
        f"(median round {results['speedup_median_round']:.2f})"
    )
    print(
        f"prompts whose batched answer differs from the one-by-one answer: {len(mismatches)} of {len(prompts)}; "
        f"that differ between batched rounds: {len(rounds_disagree)}"
    )
    write_results(args.output, results)
    return results


if __name__ == "__main__":
    main()
