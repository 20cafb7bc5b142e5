"""Collect a sweep's ``results.json`` files (one per pipeline point) into tables and a figure.

``write_report(sweep_dir)`` writes into ``<sweep_dir>/report/``:

- ``results.csv``: one row per point, harmfulness and capability before and after the attack;
- ``report.md``: a table shaped like the SDD paper's Table 1 (per backbone: each defense with no attack
  and under each attack, capability per task with its relative drop), and the utility-constrained
  worst case (per defense: the highest harmfulness over the attacks that cost at most ``max_drop`` % of
  the defended model's average capability, SEAM's criterion);
- ``harm_vs_capability.png``: harmfulness against average capability per defense and attack, as in
  SEAM's Figure 2.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

log = logging.getLogger(__name__)

# The harmfulness metric shown, in order of preference: the rubric judge's harmfulness score (1-5),
# the moderation model's flagged rate, then the offline judges' compliance rate (on topic, not refused).
HARM_METRICS = ("harmfulness_score", "harmfulness_rate", "flagged_rate", "on_topic_compliance")
NO_ATTACK = "none"
AVERAGE = "capability/average"


def collect(sweep_dir: Path) -> pd.DataFrame:
    """One row per pipeline ``results.json`` under ``sweep_dir`` (other JSON files are skipped)."""
    rows = []
    for path in sorted(Path(sweep_dir).rglob("results.json")):
        if "report" in path.relative_to(sweep_dir).parts:
            continue
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}); delete it or rerun that point.") from error
        if "point" not in record:
            continue  # an evaluate.py result, not a pipeline point
        rows.append(flatten(record, path.parent))
    if not rows:
        raise FileNotFoundError(
            f"No pipeline results.json under {sweep_dir}: give the folder of a pipeline.py run or multirun."
        )
    frame = pd.DataFrame(rows)
    return frame.sort_values(["backbone", "defense", "attack_label"], kind="stable").reset_index(drop=True)


def flatten(record: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    point = record["point"]
    setting = point.get("attack_setting")
    row: dict[str, Any] = {
        "backbone": point["backbone"], "defense": point["defense"], "attack": point["attack"],
        "attack_setting": setting,
        "attack_label": point["attack"] if setting in (None, "None") else f"{point['attack']}#{setting}",
        "seed": point.get("seed"), "run_dir": str(run_dir),
    }
    for phase in ("before_attack", "after_attack"):
        evaluation = record["evaluations"].get(phase) or {}
        harm = (evaluation.get("harmfulness") or {}).get("overall", {})
        for metric, value in harm.items():
            if metric != "num_prompts" and isinstance(value, (int, float)):
                row[f"{phase}/harm/{metric}"] = value
        accuracies = {task: 100.0 * value["acc"] for task, value in (evaluation.get("capability") or {}).items()
                      if isinstance(value, dict) and value.get("acc") is not None}
        for task, value in accuracies.items():
            row[f"{phase}/capability/{task}"] = value
        if accuracies:
            row[f"{phase}/{AVERAGE}"] = sum(accuracies.values()) / len(accuracies)
    # The numbers of the model this point ends with: attacked, or the defended one when there is no attack.
    final = "after_attack" if point["attack"] != NO_ATTACK else "before_attack"
    for key in [k for k in row if k.startswith(f"{final}/")]:
        row[f"final/{key.split('/', 1)[1]}"] = row[key]
    before, after = row.get(f"before_attack/{AVERAGE}"), row.get(f"final/{AVERAGE}")
    if before and after is not None:
        row["capability_drop_pct"] = 100.0 * (before - after) / before
    return row


def choose_harm_metric(frame: pd.DataFrame, wanted: str | None = None) -> str:
    """The column ``final/harm/<metric>`` to show: ``wanted``, else the first of HARM_METRICS present."""
    found = sorted(c.split("/", 2)[2] for c in frame if c.startswith("final/harm/"))
    if wanted:
        if wanted not in found:
            raise KeyError(f"Harmfulness metric {wanted!r} is in no result; found: {found}")
        return f"harm/{wanted}"
    available = [m for m in HARM_METRICS if m in found and frame[f"final/harm/{m}"].notna().any()]
    if not available:
        raise KeyError(f"No harmfulness metric in the results (looked for {list(HARM_METRICS)}; found {found}).")
    return f"harm/{available[0]}"


def capability_tasks(frame: pd.DataFrame) -> list[str]:
    return sorted({c.split("/", 1)[1] for c in frame if c.startswith("before_attack/capability/")} - {AVERAGE})


def table1(frame: pd.DataFrame, harm_metric: str) -> str:
    """Per backbone: each defense with no attack, then under each attack; capability per task with the
    relative drop from the defended model in parentheses, and the harmfulness metric."""
    tasks = capability_tasks(frame)
    lines = []
    for backbone, group in frame.groupby("backbone", sort=True):
        header = ["model", *[t.split("/", 1)[1] for t in tasks], "capability avg", harm_metric.split("/", 1)[1]]
        lines += [f"### {backbone}", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        for defense, rows in group.groupby("defense", sort=False):
            name = "Vanilla" if defense == NO_ATTACK else defense
            base = _defended_row(rows)
            if base is not None:
                cells = [_fmt(base.get(f"before_attack/{t}")) for t in tasks]
                lines.append(f"| {name} | " + " | ".join(cells) + f" | {_fmt(base.get('before_attack/' + AVERAGE))}"
                             f" | {_fmt(base.get(f'before_attack/{harm_metric}'))} |")
            for _, row in rows[rows["attack"] != NO_ATTACK].iterrows():
                cells = [_with_drop(row.get(f"final/{t}"), row.get(f"before_attack/{t}")) for t in tasks]
                avg = _with_drop(row.get(f"final/{AVERAGE}"), row.get(f"before_attack/{AVERAGE}"))
                lines.append(f"| {name} under {row['attack_label']} | " + " | ".join(cells)
                             + f" | {avg} | {_fmt(row.get(f'final/{harm_metric}'))} |")
        lines.append("")
    return "\n".join(lines)


def _defended_row(rows: pd.DataFrame) -> dict[str, Any] | None:
    """The defended model's numbers: its no-attack point, else any point's pre-attack evaluation."""
    for _, row in rows.sort_values("attack", key=lambda s: s != NO_ATTACK).iterrows():
        if any(pd.notna(row.get(c)) for c in rows.columns if c.startswith("before_attack/")):
            return row.to_dict()
    return None


def worst_case(frame: pd.DataFrame, harm_metric: str, max_drop: float = 10.0) -> pd.DataFrame:
    """Per backbone and defense: the highest harmfulness over attacks whose capability drop <= max_drop %."""
    attacked = frame[frame["attack"] != NO_ATTACK]
    out = []
    for (backbone, defense), rows in attacked.groupby(["backbone", "defense"], sort=True):
        admissible = rows[rows["capability_drop_pct"].notna() & (rows["capability_drop_pct"] <= max_drop)] \
            if "capability_drop_pct" in rows else rows.iloc[0:0]
        admissible = admissible[admissible[f"final/{harm_metric}"].notna()]
        worst = admissible.loc[admissible[f"final/{harm_metric}"].idxmax()] if len(admissible) else None
        out.append({
            "backbone": backbone, "defense": defense,
            f"worst {harm_metric.split('/', 1)[1]}": None if worst is None else worst[f"final/{harm_metric}"],
            "by attack": None if worst is None else worst["attack_label"],
            "its capability drop %": None if worst is None else worst["capability_drop_pct"],
            "attacks within budget": f"{len(admissible)}/{len(rows)}",
        })
    return pd.DataFrame(out)


def plot(frame: pd.DataFrame, harm_metric: str, path: Path) -> None:
    """Harmfulness against average capability: a colour per defense, a marker per attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = frame[frame[f"final/{AVERAGE}"].notna() & frame[f"final/{harm_metric}"].notna()] \
        if f"final/{AVERAGE}" in frame else frame.iloc[0:0]
    figure, axis = plt.subplots(figsize=(7, 5))
    markers = "os^vD<>pP*Xh"
    attacks = sorted(frame["attack_label"].unique())
    colours = plt.get_cmap("tab10")
    for index, (defense, rows) in enumerate(data.groupby("defense", sort=True)):
        for _, row in rows.iterrows():
            axis.scatter(row[f"final/{AVERAGE}"], row[f"final/{harm_metric}"], color=colours(index % 10),
                         marker=markers[attacks.index(row["attack_label"]) % len(markers)], s=60, alpha=0.85)
        axis.scatter([], [], color=colours(index % 10), marker="o", label="Vanilla" if defense == NO_ATTACK else defense)
    for attack in attacks:
        axis.scatter([], [], color="grey", marker=markers[attacks.index(attack) % len(markers)],
                     label="no attack" if attack == NO_ATTACK else attack)
    axis.set_xlabel("average capability (accuracy, %)")
    axis.set_ylabel(harm_metric.split("/", 1)[1])
    axis.set_title("Harmfulness vs capability after each attack")
    axis.legend(fontsize=7, loc="best", ncol=2)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)


def write_report(sweep_dir: Path, harm_metric: str | None = None, max_drop: float = 10.0) -> dict[str, Path]:
    """Write results.csv, report.md and harm_vs_capability.png into ``<sweep_dir>/report``."""
    sweep_dir = Path(sweep_dir)
    frame = collect(sweep_dir)
    metric = choose_harm_metric(frame, harm_metric)
    out = sweep_dir / "report"
    out.mkdir(exist_ok=True)
    paths = {"csv": out / "results.csv", "markdown": out / "report.md", "figure": out / "harm_vs_capability.png"}
    frame.to_csv(paths["csv"], index=False)
    worst = worst_case(frame, metric, max_drop)
    markdown = [
        f"# Sweep report: {sweep_dir}", "",
        f"{len(frame)} points. Harmfulness: `{metric.split('/', 1)[1]}`. Capability: accuracy (%) per task; in parentheses, the "
        "drop relative to the same defended model before the attack.", "",
        "## Capability and harmfulness (the shape of the SDD paper's Table 1)", "", table1(frame, metric),
        f"## Utility-constrained worst case (capability drop <= {max_drop:g}%)", "",
        "Per defense, the most harmful attack among those that keep the model useful: an attacker who wants a "
        "capable harmful model gets at most this. No attack within budget means every attack cost more "
        "capability than the budget.", "",
        _markdown_table(worst), "",
    ]
    paths["markdown"].write_text("\n".join(markdown))
    plot(frame, metric, paths["figure"])
    return paths


def _markdown_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(no attacked point)"
    header = list(frame.columns)
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]) for c in header) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "—"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _with_drop(value: Any, reference: Any) -> str:
    if value is None or pd.isna(value):
        return "—"
    if reference is None or pd.isna(reference) or not reference:
        return _fmt(value)
    return f"{value:.2f} ({100.0 * (reference - value) / reference:.0f}%)"


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Tables and a figure from a pipeline sweep's results.json files.")
    parser.add_argument("sweep_dir", type=Path, help="a pipeline.py run or multirun folder")
    parser.add_argument("--harm-metric", default=None, help=f"default: the first present of {list(HARM_METRICS)}")
    parser.add_argument("--max-drop", type=float, default=10.0,
                        help="capability budget of the worst case, in %% of the defended model's average")
    args = parser.parse_args(argv)
    paths = write_report(args.sweep_dir, args.harm_metric, args.max_drop)
    print(paths["markdown"].read_text())
    print("\n".join(f"{kind}: {path}" for kind, path in paths.items()))
