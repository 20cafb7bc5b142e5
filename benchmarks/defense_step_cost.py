"""Cost of one training step of every defense in ``conf/defense/``, relative to plain SFT (``defense=sdd``).

Each defense is composed from ``conf/train.yaml`` (``defense=<name>``, the demo corpus) and built as
``sdd.training.train`` builds it, with the same per-stream batch size and max length for all. A Lightning
callback times ``on_train_batch_start`` -> ``on_train_batch_end`` (forward and backward passes, optimizer
step; data loading excluded) for ``--steps`` steps after ``--warmup`` steps. Plain SFT is measured again right
before every defense and each defense is divided by that adjacent run, so slow changes in the load of a shared
machine cancel out. Defenses are discovered from the config folder, so new ones are measured without changing
this script; one that fails is reported as an error row.

A step is not the same work for every defense: multi-stream defenses draw one batch per stream (so several
batches per step), and some run extra passes (a frozen reference model, simulated attacks). The table
therefore also gives the sequences drawn per step and, counted during the warmup steps, the causal-LM
forward passes per step and the sequences they process.

    .venv/bin/python benchmarks/defense_step_cost.py                                  # tiny backbone
    .venv/bin/python benchmarks/defense_step_cost.py --defenses sdd,tar --backbone smollm2_135m_instruct
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CONF_DIR, add_common_arguments, compose, machine, print_table, set_threads, write_results

NAME = "defense_step_cost"
REFERENCE = "sdd"  # plain SFT on the SDD pairs


def discover_defenses() -> list[str]:
    names = sorted(path.stem for path in (CONF_DIR / "defense").glob("*.yaml"))
    return sorted(names, key=lambda name: name != REFERENCE)  # the reference first


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny_llama", help="a conf/backbone option")
    parser.add_argument(
        "--defenses",
        default=None,
        help="comma-separated subset of conf/defense/ (default: all; sdd is always measured)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="per stream")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per defense")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (forward passes are counted here)")
    add_common_arguments(parser, NAME)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1")
    available = discover_defenses()
    if args.defenses:
        wanted = [d.strip() for d in args.defenses.split(",") if d.strip()]
        unknown = sorted(set(wanted) - set(available))
        if unknown:
            parser.error(f"unknown defense(s) {unknown}; conf/defense/ has {available}")
        args.defenses = [REFERENCE] + [d for d in wanted if d != REFERENCE]
    else:
        args.defenses = available
    return args


def count_sequences(batch: Any) -> int:
    """Rows of every ``input_ids`` in a batch, or in every stream of a ``{stream: batch}`` dict."""
    if isinstance(batch, dict):
        if "input_ids" in batch:
            return int(batch["input_ids"].shape[0])
        return sum(count_sequences(value) for value in batch.values())
    return 0


def step_timer(warmup: int, steps: int):
    import lightning as L
    import torch
    from transformers import GenerationMixin

    class StepTimer(L.Callback):
        """Times each training step; counts causal-LM forward passes during the warmup steps."""

        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.sequences: list[int] = []
            self.tokens: list[int] = []
            self.forwards: list[int] = []
            self.forward_rows: list[int] = []
            self._calls = self._rows = 0
            self._hook = None
            self._started = 0.0

        def _count(self, module, args, kwargs, output) -> None:
            if isinstance(module, GenerationMixin):  # top-level LMs only, not their inner blocks
                inputs = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
                self._calls += 1
                self._rows += int(inputs.shape[0]) if isinstance(inputs, torch.Tensor) else 0

        def on_train_start(self, trainer, module) -> None:
            # A global hook sees every model the step runs (the trained one, frozen references, copies).
            self._hook = torch.nn.modules.module.register_module_forward_hook(self._count, with_kwargs=True)

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            self._calls = self._rows = 0
            self._started = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            elapsed = time.perf_counter() - self._started
            from sdd.modules.sft import count_tokens

            done = len(self.seconds) + len(self.forwards)
            if done < warmup:
                self.forwards.append(self._calls)
                self.forward_rows.append(self._rows)
                if done + 1 == warmup:
                    self.remove_hook()  # the timed steps run without it
            else:
                self.seconds.append(elapsed)
                self.sequences.append(count_sequences(batch))
                self.tokens.append(count_tokens(batch))
            if len(self.seconds) >= steps:
                trainer.should_stop = True

        def remove_hook(self) -> None:
            if self._hook is not None:
                self._hook.remove()
                self._hook = None

    return StepTimer()


def measure(defense: str, args: argparse.Namespace, output_dir: Path) -> dict[str, Any]:
    import lightning as L
    from hydra.utils import instantiate

    cfg = compose([f"defense={defense}", f"backbone={args.backbone}", f"paths.output_dir={output_dir}", *args.override])
    for key, value in (("batch_size", args.batch_size), ("max_length", args.max_length)):
        if key not in cfg.data:
            raise ValueError(f"the data config of defense={defense} has no data.{key} to set")
        cfg.data[key] = value  # streams interpolate the top-level sizes
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    backbone = instantiate(cfg.backbone)
    datamodule = instantiate(cfg.data)
    datamodule.connect(backbone.load_tokenizer())
    module = instantiate(cfg.module, backbone=backbone)
    timer = step_timer(args.warmup, args.steps)
    # max_steps sizes the defenses' schedules; the timer stops the run after warmup + steps batches.
    trainer = instantiate(
        cfg.trainer,
        max_steps=args.warmup + args.steps,
        max_epochs=-1,
        callbacks=[timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(output_dir),
    )
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        timer.remove_hook()
    if len(timer.seconds) < args.steps:
        raise RuntimeError(
            f"training stopped after {len(timer.seconds)} of {args.steps} timed steps "
            f"(global_step {trainer.global_step}: several optimizer steps per batch?)"
        )
    return {
        "module": cfg.module._target_,
        "data": cfg.data._target_,
        "mean_step_seconds": statistics.fmean(timer.seconds),
        "median_step_seconds": statistics.median(timer.seconds),
        "sequences_per_step": statistics.fmean(timer.sequences),
        "tokens_per_step": statistics.fmean(timer.tokens),
        "forward_passes_per_step": statistics.fmean(timer.forwards),
        "sequences_forwarded_per_step": statistics.fmean(timer.forward_rows),
    }


def measure_or_error(defense: str, args: argparse.Namespace, output_dir: Path) -> dict[str, Any]:
    """``measure``, or ``{"error": ...}`` when the defense fails: the other defenses still run."""
    print(f"{defense} ...", flush=True)
    try:
        return measure(defense, args, output_dir)
    except Exception as error:
        last = traceback.format_exception_only(type(error), error)[-1].strip()[:300]
        print(f"  {defense} failed: {last}", flush=True)
        return {"error": last}
    finally:
        gc.collect()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    set_threads(args.threads)
    info = machine()
    others: dict[str, dict[str, Any]] = {}
    references: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sdd-bench-") as tmp:
        # The reference is measured again right before every defense, and each defense is compared with
        # that adjacent run, so slow changes in the machine's load (other jobs) cancel out of the ratios.
        for index, defense in enumerate([d for d in args.defenses if d != REFERENCE] or [None]):
            reference = measure_or_error(REFERENCE, args, Path(tmp) / f"{REFERENCE}-{index}")
            references.append(reference)
            if defense is None:
                break
            row = measure_or_error(defense, args, Path(tmp) / defense)
            if "error" not in row and "error" not in reference:
                row["reference_mean_step_seconds"] = reference["mean_step_seconds"]
                row["relative_to_sft"] = row["mean_step_seconds"] / reference["mean_step_seconds"]
                row["relative_to_sft_median"] = row["median_step_seconds"] / reference["median_step_seconds"]
                row["relative_to_sft_per_sequence"] = row["relative_to_sft"] * (
                    reference["sequences_per_step"] / row["sequences_per_step"]
                )
            others[defense] = row

    measured = [r for r in references if "error" not in r]
    if measured:
        runs = [r["mean_step_seconds"] for r in measured]
        reference_row = {
            **measured[0],
            "mean_step_seconds": statistics.fmean(runs),
            "median_step_seconds": statistics.median(r["median_step_seconds"] for r in measured),
            "runs_mean_step_seconds": runs,
            "relative_to_sft": 1.0,
            "relative_to_sft_median": 1.0,
            "relative_to_sft_per_sequence": 1.0,
        }
    else:
        reference_row = references[0]
    rows = {REFERENCE: reference_row, **others}
    results = {
        "benchmark": NAME,
        "description": f"mean wall time of one training step relative to plain SFT (defense={REFERENCE}), each "
        "defense against an SFT run measured right before it",
        "settings": {
            "backbone": args.backbone,
            "batch_size_per_stream": args.batch_size,
            "max_length": args.max_length,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "corpus": "demo",
            "torch_threads": torch.get_num_threads(),
            "overrides": args.override,
        },
        "note": "multi-stream defenses draw one batch per stream each step (sequences_per_step); extra passes "
        "(frozen references, simulated attacks) show in forward_passes_per_step, counted in warmup steps",
        "defenses": rows,
        "machine": info,
    }

    print(
        f"\nStep cost relative to plain SFT (defense={REFERENCE}), {args.backbone}, batch {args.batch_size} per "
        f"stream x <= {args.max_length} tokens, {args.steps} timed steps after {args.warmup} warmup"
    )
    table = []
    for name, row in rows.items():
        if "error" in row:
            table.append([name, None, None, None, None, None, None, None, f"ERROR: {row['error'][:80]}"])
        else:
            table.append(
                [
                    name,
                    row["mean_step_seconds"] * 1000,
                    row.get("relative_to_sft"),
                    row.get("relative_to_sft_median"),
                    row["sequences_per_step"],
                    row["tokens_per_step"],
                    row["forward_passes_per_step"],
                    row["sequences_forwarded_per_step"],
                    row["module"].rsplit(".", 1)[-1],
                ]
            )
    print_table(
        [
            "defense",
            "ms/step (mean)",
            "x SFT (mean)",
            "x SFT (median)",
            "seqs/step",
            "tokens/step",
            "LM forwards/step",
            "seqs forwarded/step",
            "module",
        ],
        table,
    )
    if measured:
        print(
            f"{REFERENCE}: mean of {len(runs)} reference runs (one right before each defense, which is compared "
            f"with it): " + ", ".join(f"{1000 * r:.1f}" for r in runs) + " ms/step"
        )
    print("Multi-stream defenses process several batches per step (seqs/step); forwards counted in warmup steps.")
    write_results(args.output, results)
    return results


if __name__ == "__main__":
    main()
