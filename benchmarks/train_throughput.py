"""Training throughput of our stack (``SFTModule`` under a Lightning Trainer) against a plain
``transformers.Trainer`` on the same work.

Both frameworks train a fresh copy of the same model (fp32, CPU unless the config says otherwise) on the
same tokenized batches in the same order (the first batches of the SDD data module, checked by
fingerprint), with the same optimizer and scheduler (instantiated from the same Hydra config), the same
gradient clipping and one batch per optimizer step. Each run is ``--warmup`` untimed steps, then timed
steps; the rounds alternate which framework goes first. Throughput is non-padding tokens of the timed
steps over the wall time from the end of the last warmup step to the end of the last step (everything
between steps counts: data loading, logging, callbacks).

    .venv/bin/python benchmarks/train_throughput.py                        # SmolLM2-135M-Instruct
    .venv/bin/python benchmarks/train_throughput.py --backbone tiny_llama  # seconds
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_arguments, compose, machine, print_table, set_threads, write_results

NAME = "train_throughput"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="smollm2_135m_instruct", help="a conf/backbone option")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per framework, over all rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of every run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per framework, alternating which goes first")
    add_common_arguments(parser, NAME)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.rounds < 1:
        parser.error("--steps, --warmup and --rounds must be at least 1")
    return args


def fingerprint(batch: dict[str, Any]) -> str:
    return hashlib.sha1(batch["input_ids"].cpu().numpy().tobytes()).hexdigest()[:12]


class Clock:
    """Step end times, losses and batch fingerprints of one run (filled by either framework's callback)."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.losses: list[float] = []
        self.batches: list[str] = []

    def summary(self, warmup: int, tokens_per_step: list[int]) -> dict[str, Any]:
        timed = len(self.ends) - warmup
        seconds = self.ends[-1] - self.ends[warmup - 1]
        tokens = sum(tokens_per_step[warmup : warmup + timed])
        step_seconds = [b - a for a, b in zip(self.ends[warmup - 1 : -1], self.ends[warmup:])]
        step_rates = [n / t for n, t in zip(tokens_per_step[warmup:], step_seconds)]
        return {
            "timed_steps": timed,
            "tokens": tokens,
            "seconds": seconds,
            "step_seconds": step_seconds,
            "step_tokens_per_second": step_rates,
        }


def lightning_run(cfg, backbone, datamodule, num_steps: int, output_dir: Path) -> Clock:
    """Our path, as ``sdd.training.train`` builds it (without checkpoints and the final save)."""
    import lightning as L
    from hydra.utils import instantiate

    clock = Clock()

    class StepClock(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            clock.ends.append(time.perf_counter())
            clock.losses.append(float(outputs["loss"]))
            clock.batches.append(fingerprint(batch))

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = instantiate(cfg.module, backbone=backbone)
    logger = instantiate(cfg.logger, save_dir=str(output_dir)) if cfg.get("logger") else False
    trainer = instantiate(
        cfg.trainer,
        max_steps=num_steps,
        callbacks=[StepClock()],
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(output_dir),
    )
    trainer.fit(module, datamodule=datamodule)
    del module, trainer
    gc.collect()
    return clock


def hf_trainer_run(cfg, backbone, batches: list[dict[str, Any]], num_steps: int, output_dir: Path) -> Clock:
    """A plain ``transformers.Trainer`` fed the same batches in the same order."""
    import torch
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader, Dataset
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments, set_seed

    clock = Clock()

    class FixedBatches(Dataset):
        def __len__(self) -> int:
            return len(batches)

        def __getitem__(self, index: int) -> dict[str, Any]:
            return batches[index]

    class FixedBatchTrainer(Trainer):
        def get_train_dataloader(self) -> DataLoader:  # the documented hook for a custom loader
            return self.accelerator.prepare(DataLoader(FixedBatches(), batch_size=None, shuffle=False))

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs) -> None:
            clock.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs) -> None:
            if logs and "loss" in logs:
                clock.losses.append(float(logs["loss"]))

    set_seed(cfg.seed)
    model = backbone.load_model()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = instantiate(cfg.optimizer)(params=params)
    scheduler = None
    if cfg.get("scheduler"):
        warmup = int(cfg.module.get("warmup_ratio", 0.0) * num_steps)
        scheduler = instantiate(cfg.scheduler)(
            optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=num_steps
        )
    use_cpu = cfg.trainer.accelerator == "cpu" or not torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=num_steps,
        per_device_train_batch_size=batches[0]["input_ids"].shape[0],
        gradient_accumulation_steps=1,
        learning_rate=float(cfg.optimizer.lr),
        max_grad_norm=float(cfg.trainer.gradient_clip_val or 0.0),
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=use_cpu,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=cfg.seed,
    )
    trainer = FixedBatchTrainer(
        model=model, args=args, train_dataset=FixedBatches(), optimizers=(optimizer, scheduler), callbacks=[StepClock()]
    )
    trainer.remove_callback(PrinterCallback)  # Lightning's progress bar is off too
    trainer.train()
    clock.batches = [fingerprint(b) for b in batches[:num_steps]]  # fed in this order by construction
    del model, trainer, optimizer
    gc.collect()
    return clock


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch
    from hydra.utils import instantiate

    from sdd.modules.sft import count_tokens

    steps_per_round = math.ceil(args.steps / args.rounds)
    num_steps = args.warmup + steps_per_round
    set_threads(args.threads)
    info = machine()
    with tempfile.TemporaryDirectory(prefix="sdd-bench-") as tmp:
        cfg = compose(
            [
                f"backbone={args.backbone}",
                "defense=sdd",
                f"data.batch_size={args.batch_size}",
                f"data.max_length={args.max_length}",
                f"paths.output_dir={tmp}",
                *args.override,
            ]
        )
        backbone = instantiate(cfg.backbone)
        tokenizer = backbone.load_tokenizer()
        datamodule = instantiate(cfg.data)
        datamodule.connect(tokenizer)
        datamodule.prepare_data()
        datamodule.setup("fit")
        loader_iter = iter(datamodule.train_dataloader())  # the order Lightning sees (seeded shuffle)
        batches = []
        for _ in range(num_steps):
            batch = next(loader_iter, None)
            if batch is None:
                raise SystemExit(
                    f"The data has fewer than {num_steps} batches: raise data.num_examples "
                    f"(--override data.num_examples=...) or lower --steps / --warmup."
                )
            batches.append(batch)
        tokens_per_step = [count_tokens(b) for b in batches]

        runs: dict[str, list[Clock]] = {"ours": [], "trainer": []}
        for round_index in range(args.rounds):
            order = ["ours", "trainer"] if round_index % 2 == 0 else ["trainer", "ours"]
            for framework in order:
                print(f"round {round_index + 1}/{args.rounds}: {framework}, {num_steps} steps", flush=True)
                folder = Path(tmp) / f"{framework}-{round_index}"
                if framework == "ours":
                    clock = lightning_run(cfg, backbone, datamodule, num_steps, folder)
                else:
                    clock = hf_trainer_run(cfg, backbone, batches, num_steps, folder)
                if len(clock.ends) != num_steps:
                    raise RuntimeError(f"{framework} ran {len(clock.ends)} steps, expected {num_steps}")
                runs[framework].append(clock)

    expected = [fingerprint(b) for b in batches]
    same_batches = all(c.batches == expected for clocks in runs.values() for c in clocks)
    frameworks: dict[str, Any] = {}
    for framework, clocks in runs.items():
        parts = [c.summary(args.warmup, tokens_per_step) for c in clocks]
        tokens, seconds = sum(p["tokens"] for p in parts), sum(p["seconds"] for p in parts)
        steps = sum(p["timed_steps"] for p in parts)
        frameworks[framework] = {
            "timed_steps": steps,
            "tokens": tokens,
            "seconds": round(seconds, 3),
            "tokens_per_second": tokens / seconds,
            "seconds_per_step": seconds / steps,
            "median_step_tokens_per_second": statistics.median(r for p in parts for r in p["step_tokens_per_second"]),
            "rounds": [{**p, "tokens_per_second": p["tokens"] / p["seconds"]} for p in parts],
            "losses_first_round": clocks[0].losses,
        }
    ours, reference = runs["ours"][0].losses, runs["trainer"][0].losses
    loss_gap = max((abs(a - b) for a, b in zip(ours, reference)), default=None)
    results = {
        "benchmark": NAME,
        "description": "training tokens/s: SFTModule under a Lightning Trainer vs a plain transformers.Trainer",
        "settings": {
            "backbone": args.backbone,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "warmup_steps_per_run": args.warmup,
            "timed_steps_per_run": steps_per_round,
            "rounds": args.rounds,
            "optimizer": cfg.optimizer._target_,
            "lr": float(cfg.optimizer.lr),
            "precision": cfg.trainer.precision,
            "gradient_clip_val": cfg.trainer.gradient_clip_val,
            "torch_threads": torch.get_num_threads(),
            "overrides": args.override,
        },
        "frameworks": frameworks,
        "ratio_ours_over_trainer": frameworks["ours"]["tokens_per_second"] / frameworks["trainer"]["tokens_per_second"],
        # Less sensitive to load spikes from other jobs: the ratio of the median per-step rates, and per round.
        "ratio_ours_over_trainer_median_step": (
            frameworks["ours"]["median_step_tokens_per_second"] / frameworks["trainer"]["median_step_tokens_per_second"]
        ),
        "ratio_ours_over_trainer_per_round": [
            o["tokens_per_second"] / t["tokens_per_second"]
            for o, t in zip(frameworks["ours"]["rounds"], frameworks["trainer"]["rounds"])
        ],
        "same_batches": same_batches,
        "max_abs_loss_difference_first_round": loss_gap,
        "machine": info,
    }

    print(
        f"\nTraining throughput, {args.backbone}, batch {args.batch_size} x <= {args.max_length} tokens, "
        f"{args.rounds} rounds x ({args.warmup} warmup + {steps_per_round} timed) steps per framework"
    )
    print_table(
        ["framework", "timed steps", "tokens", "seconds", "tokens/s", "s/step", "median step tokens/s"],
        [
            [
                label,
                f["timed_steps"],
                f["tokens"],
                f["seconds"],
                f["tokens_per_second"],
                f["seconds_per_step"],
                f["median_step_tokens_per_second"],
            ]
            for label, f in (
                ("ours (SFTModule + Lightning)", frameworks["ours"]),
                ("transformers.Trainer", frameworks["trainer"]),
            )
        ],
    )
    print(
        f"ratio ours / Trainer (tokens/s): {results['ratio_ours_over_trainer']:.3f}; of the median step: "
        f"{results['ratio_ours_over_trainer_median_step']:.3f}; per round: "
        + ", ".join(f"{r:.3f}" for r in results["ratio_ours_over_trainer_per_round"])
    )
    print(
        f"same batches in the same order: {same_batches}; max |loss difference| per step, round 1: "
        f"{loss_gap if loss_gap is None else f'{loss_gap:.2e}'} (about 0 when both compute the same thing)"
    )
    write_results(args.output, results)
    return results


if __name__ == "__main__":
    main()
