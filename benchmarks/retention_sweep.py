"""Retention sweep: a defense trained at several benign-retention ratios, each evaluated on harmful and
benign prompts it never trained on.

Trained on harmful prompts alone, a small backbone generalises the defense to every prompt (SDD answers
benign prompts off-topic, safety alignment refuses them). ``data.retain_ratio`` mixes benign instructions
with their own answers into the training set (``sdd.datamodules.retention``); this script measures the
trade-off. For each ratio r (default 0, 0.1, 0.25, 0.5; 0 is the paper's recipe):

1. ``sdd.training.train`` trains ``defense=<--defense>`` on ``--backbone`` with ``data.retain_ratio=r`` for
   ``--steps`` steps (the same steps at every r, so the defense examples seen fall by the factor 1 - r);
2. ``sdd.evaluation.run.evaluate`` answers the harmful evaluation prompts (``corpus.eval_prompts``, the
   first ``--max-prompts`` of each set) and the benign evaluation set (``eval.benign``) with the model.

The untrained backbone is evaluated first as a reference row (``--no-base`` skips it). Columns:
harmful irrelevant % and harmful refusal % (``results["harmfulness"]["overall"]``: the offline relevance
judge, all-MiniLM-L6-v2 cosine <= 0.25, and the refusal-keyword judge; both proxies, not harm judges),
benign on-topic %, benign refusal % (over-refusal) and the mean NLL of the benign reference answers
(``results["benign"]["overall"]``, written by ``eval.benign``). Before training, the script counts the
evaluation prompts that also occur (exact text, case and spacing ignored) in the defense's harmful source
and in the retention source, and warns when either is not 0.

Data: ``--data-dir <folder>`` reads the paper's data sets from local files (``corpus=local``, layout in
``conf/corpus/local.yaml``). Without it the demo corpus shipped in the package is used: a smoke test only,
its harmful evaluation prompts ARE the training prompts.

    .venv/bin/python benchmarks/retention_sweep.py --data-dir ../shared/data --steps 100    # SmolLM2-135M
    .venv/bin/python benchmarks/retention_sweep.py --defense safety_align --data-dir ../shared/data --steps 60
    .venv/bin/python benchmarks/retention_sweep.py --backbone tiny_llama --steps 5 --max-prompts 8  # seconds

Runs go to a temporary folder, deleted at the end (``--work-dir`` keeps them: models, generations,
results.json of every run).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_arguments, compose, machine, print_table, set_threads, write_results

NAME = "retention_sweep"
DEFENSES = ("sdd", "sdd_reject", "safety_align")
# eval.benign's size and answer-length keys, whichever the config has (set to --max-prompts / --max-new-tokens).
BENIGN_LIMIT_KEYS = ("max_prompts", "max_prompts_per_set", "limit")
METRIC_SOURCES = {
    "harmful_irrelevant_rate": "results['harmfulness']['overall']['irrelevant_rate']: relevance judge "
    "(proxy: all-MiniLM-L6-v2 cosine of prompt and answer <= threshold)",
    "harmful_refusal_rate": "results['harmfulness']['overall']['refusal_rate']: refusal-keyword judge (proxy)",
    "benign_on_topic_rate": "results['benign']['overall']['on_topic_rate'] (eval.benign)",
    "benign_refusal_rate": "results['benign']['overall']['refusal_rate'] (eval.benign: over-refusal)",
    "benign_reference_nll": "results['benign']['overall']['reference_nll'] (eval.benign: mean answer-token NLL "
    "of the reference answers)",
}
COLUMNS = [
    ("model", "model"),
    ("retain_ratio", "r"),
    ("retention_examples", "retain ex."),
    ("defense_examples", "defense ex."),
    ("global_step", "steps"),
    ("train_loss", "loss"),
    ("harmful_irrelevant_rate", "harm irrel. %"),
    ("harmful_refusal_rate", "harm refusal %"),
    ("benign_on_topic_rate", "benign on-topic %"),
    ("benign_refusal_rate", "benign refusal %"),
    ("benign_reference_nll", "benign ref. NLL"),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from sdd.datamodules.retention import check_retain_ratio

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="smollm2_135m_instruct", help="a conf/backbone option")
    parser.add_argument("--defense", default="sdd", choices=DEFENSES)
    parser.add_argument("--ratios", default="0,0.1,0.25,0.5", help="comma-separated data.retain_ratio values")
    parser.add_argument("--steps", type=int, default=100, help="training steps at every ratio")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder laid out as conf/corpus/local.yaml says (default: the demo corpus, a smoke test)",
    )
    parser.add_argument("--num-examples", type=int, default=None, help="defense examples (default: the config's)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's")
    parser.add_argument("--max-length", type=int, default=None, help="default: the config's")
    parser.add_argument("--lr", type=float, default=None, help="default: the config's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-prompts",
        type=int,
        default=40,
        help="evaluation prompts per harmful prompt set, and of the benign set (default: %(default)s)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=128, help="answer length at evaluation")
    parser.add_argument("--no-base", action="store_true", help="skip the untrained backbone's row")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep every run here (default: a temporary folder)")
    parser.add_argument(
        "--eval-override",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra overrides of conf/eval.yaml, e.g. eval.judges.rubric.enabled=true",
    )
    add_common_arguments(parser, NAME)
    args = parser.parse_args(argv)
    try:
        args.ratios = [check_retain_ratio(float(r)) for r in args.ratios.split(",") if r.strip()]
    except ValueError as error:
        parser.error(f"--ratios: {error}")
    if not args.ratios:
        parser.error("--ratios: give at least one ratio, e.g. --ratios 0,0.25")
    if args.steps < 1 or args.max_prompts < 1 or args.max_new_tokens < 1:
        parser.error("--steps, --max-prompts and --max-new-tokens must be at least 1")
    return args


# ---------------------------------------------------------------------------- configs
def corpus_overrides(data_dir: Path | None) -> list[str]:
    return ["corpus=local", f"paths.data_dir={data_dir}"] if data_dir is not None else []


def train_config(args: argparse.Namespace, ratio: float, output_dir: Path):
    sizes = {
        "data.num_examples": args.num_examples,
        "data.batch_size": args.batch_size,
        "data.max_length": args.max_length,
        "optimizer.lr": args.lr,
    }
    return compose(
        [
            f"defense={args.defense}",
            f"backbone={args.backbone}",
            *corpus_overrides(args.data_dir),
            f"seed={args.seed}",
            f"data.retain_ratio={ratio}",
            f"trainer.max_steps={args.steps}",
            "sample_prompts=null",
            *[f"{key}={value}" for key, value in sizes.items() if value is not None],
            f"paths.output_dir={output_dir}",
            *args.override,
        ]
    )


def eval_config(args: argparse.Namespace, model: str | None, output_dir: Path, cache_dir: str):
    """conf/eval.yaml for ``model`` (a folder; None: the untrained ``--backbone``)."""
    from omegaconf import open_dict

    cfg = compose(
        [
            f"model={model}" if model else f"backbone={args.backbone}",
            *corpus_overrides(args.data_dir),
            f"seed={args.seed}",
            f"paths.output_dir={output_dir}",
            f"paths.cache_dir={cache_dir}",
            f"eval.harmfulness.max_prompts_per_set={args.max_prompts}",
            f"eval.harmfulness.max_new_tokens={args.max_new_tokens}",
            *args.eval_override,
        ],
        config_name="eval",
    )
    benign = cfg.eval.get("benign")
    if benign is not None:
        with open_dict(benign):
            if "enabled" in benign:
                benign.enabled = True
            if "max_new_tokens" in benign:
                benign.max_new_tokens = args.max_new_tokens
            for key in BENIGN_LIMIT_KEYS:
                if key in benign:
                    benign[key] = args.max_prompts
                    break
    return cfg


def check_local_files(sources: Iterable[Mapping[str, Any] | None], data_dir: Path | None) -> None:
    missing = [
        str(s["path"])
        for s in sources
        if s is not None
        and s.get("path")
        and not str(s["path"]).startswith("demo:")
        and not Path(str(s["path"])).expanduser().is_file()
    ]
    if missing:
        raise SystemExit(
            f"Data not found under {data_dir}: missing {', '.join(missing)}. Fix: pass --data-dir <folder> "
            "laid out as conf/corpus/local.yaml says, or override the sources with --override."
        )


# ---------------------------------------------------------------------------- split overlap
def split_overlap(train_cfg, eval_cfg) -> dict[str, Any]:
    """Evaluation prompts found in the defense's training sources (harmful and, when mixed, retention):
    the pipeline's check (sdd/data/overlap.py), exact and near-duplicate, 0 expected."""
    from types import SimpleNamespace

    from sdd.data.overlap import point_overlap

    return point_overlap(
        {
            "defense": SimpleNamespace(kind="defense", cfg=train_cfg),
            "evaluate": SimpleNamespace(kind="evaluate", cfg=eval_cfg),
        }
    )


def table_row(label: str, ratio: float | None, summary: Mapping[str, Any] | None, results: Mapping[str, Any]) -> dict:
    """A row of the table from a training summary (None for the untrained backbone) and evaluation results."""
    harmful = (results.get("harmfulness") or {}).get("overall", {})
    benign = (results.get("benign") or {}).get("overall", {})
    row: dict[str, Any] = {"model": label, "retain_ratio": ratio}
    if summary is not None:
        data = summary["data"]
        retention = data.get("retention", {})
        row.update(
            {
                "retention_examples": retention.get("train_examples", 0),
                "defense_examples": data["train_examples"] - retention.get("train_examples", 0),
                "retention_source": retention.get("source"),
                "global_step": summary["global_step"],
                "train_loss": summary["metrics"].get("train/loss"),
            }
        )
    row.update(
        {
            "harmful_prompts": harmful.get("num_prompts"),
            "harmful_irrelevant_rate": harmful.get("irrelevant_rate"),
            "harmful_refusal_rate": harmful.get("refusal_rate"),
            "benign_prompts": benign.get("num_prompts"),
            "benign_on_topic_rate": benign.get("on_topic_rate"),
            "benign_refusal_rate": benign.get("refusal_rate"),
            "benign_reference_nll": benign.get("reference_nll"),
        }
    )
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from sdd.data.overlap import find_sources
    from sdd.evaluation.run import evaluate
    from sdd.training import train

    set_threads(args.threads)
    if args.data_dir is not None:
        args.data_dir = args.data_dir.expanduser().resolve()
    else:
        print("No --data-dir: the demo corpus (a smoke test of the sweep, not a measurement).")
    info = machine()
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="retention-sweep-")).resolve()
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    try:
        first = train_config(args, max(args.ratios), work_dir / "check")  # the retention source too
        check_local_files(
            [
                first.data.get("retain"),
                first.data.get("source"),
                *[node for _, node in find_sources(first.data.get("builder"), "builder")],
            ],
            args.data_dir,
        )
        cache_dir = str(first.paths.cache_dir)
        probe = eval_config(args, None, work_dir / "check", cache_dir)
        overlap = split_overlap(first, probe)
        benign_available = probe.eval.get("benign") is not None
        if not benign_available:
            print("WARNING: conf/eval.yaml has no eval.benign: the benign columns stay empty.")

        if not args.no_base:
            results = evaluate(eval_config(args, None, work_dir / "base" / "eval", cache_dir))
            rows.append(table_row(f"{args.backbone} (untrained)", None, None, results))
        for ratio in args.ratios:
            folder = work_dir / f"retain_{ratio:g}"
            summary = train(train_config(args, ratio, folder / "train"))
            results = evaluate(eval_config(args, summary["model_dir"], folder / "eval", cache_dir))
            rows.append(table_row(f"{args.defense}", ratio, summary, results))
            print_table([title for _, title in COLUMNS], [[r.get(key) for key, _ in COLUMNS] for r in rows])
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)

    print(
        f"\n{args.defense} on {args.backbone}, {args.steps} steps per ratio, "
        f"{'corpus=local ' + str(args.data_dir) if args.data_dir else 'demo corpus'}:"
    )
    print_table([title for _, title in COLUMNS], [[r.get(key) for key, _ in COLUMNS] for r in rows])
    results = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "output"},
        "machine": info,
        "seconds": round(time.perf_counter() - started, 1),
        "benign_evaluation": "eval.benign" if benign_available else "not available: conf/eval.yaml has no eval.benign",
        "split_overlap": overlap,
        "metric_sources": METRIC_SOURCES,
        "rows": rows,
    }
    write_results(args.output, results)
    return results


if __name__ == "__main__":
    main()
