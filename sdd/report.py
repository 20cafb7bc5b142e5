"""Collect a sweep's ``results.json`` files (one per pipeline point) into tables and a figure.

``write_report(sweep_dir)`` writes into ``<sweep_dir>/report/``:

- ``results.csv``: one row per point, harmfulness, benign behaviour and capability before and after the
  attack, judge agreement, and the point's train/evaluation data overlap;
- ``report.md``: a table shaped like the SDD paper's Table 1 (per backbone: each defense with no attack
  and under each attack, capability per task with its relative drop, harmfulness, and the benign
  columns: on-topic rate, over-refusal, reference-answer NLL), judge agreement when two judges ran, and
  the utility-constrained worst case (per defense: the highest harmfulness over the attacks that cost at
  most ``max_drop`` % of the defended model's average capability, SEAM's criterion);
- ``harm_vs_capability.png``: harmfulness against average capability per defense and attack, as in
  SEAM's Figure 2.

The harm column is a judge's metric when one ran; otherwise it is the offline ``on_topic_compliance``,
labelled "(proxy)" everywhere and announced in the header: it measures topicality, not harm. A
``results.json`` that cannot be read is listed (in the report and on stderr) and the others are reported;
``main`` then returns 1.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

log = logging.getLogger(__name__)

# The harmfulness metric shown, in order of preference: the rubric judge's harmfulness score (1-5), the
# StrongREJECT score (0-1), the safety classifier's unsafe rate, the moderation model's flagged rate, and
# last the offline proxy (on topic and not refused), which is no harm judge.
HARM_METRICS = ("harmfulness_score", "strongreject_score", "classifier_unsafe_rate", "flagged_rate",
                "on_topic_compliance")
# Metrics of the offline judges (relevance encoder, refusal keywords): proxies, never called harmfulness.
PROXY_METRICS = ("on_topic_compliance", "refusal_rate", "explicit_rejection_rate", "mean_relevance",
                 "irrelevant_rate")
RENAMED = {"compliance_rate": "on_topic_compliance"}  # old results.json name -> current name
# Benign behaviour (sdd/evaluation/benign.py): column -> label in report.md.
BENIGN_COLUMNS = {"on_topic_rate": "benign on-topic % (proxy)", "refusal_rate": "over-refusal % (proxy)",
                  "reference_nll": "reference NLL"}
NO_ATTACK = "none"
AVERAGE = "capability/average"
OVERLAP = ("data_overlap/exact", "data_overlap/near_duplicate")


def collect(sweep_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """One row per pipeline ``results.json`` under ``sweep_dir`` (other JSON files are skipped).

    Returns:
        The rows, and one line per ``results.json`` that could not be read (path and reason).

    Raises:
        FileNotFoundError: no readable pipeline result at all.
    """
    rows, unreadable = [], []
    for path in sorted(Path(sweep_dir).rglob("results.json")):
        if "report" in path.relative_to(sweep_dir).parts:
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(record, dict) or "point" not in record:
                continue  # an evaluate.py result, not a pipeline point
            rows.append(flatten(record, path.parent))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            unreadable.append(f"{path} ({type(error).__name__}: {error})")
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            unreadable.append(f"{path} (not a complete pipeline result: {type(error).__name__}: {error})")
    if not rows:
        more = f"; unreadable: {'; '.join(unreadable)}" if unreadable else ""
        raise FileNotFoundError(
            f"No pipeline results.json under {sweep_dir}: give the folder of a pipeline.py run or multirun{more}."
        )
    frame = pd.DataFrame(rows)
    frame = frame.sort_values(["backbone", "defense", "attack_label"], kind="stable").reset_index(drop=True)
    return frame, unreadable


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
            if metric != "num_prompts" and _is_number(value):
                row[f"{phase}/harm/{RENAMED.get(metric, metric)}"] = value
        for pair, stats in (harm.get("agreement") or {}).items():  # {"a|b": {num_items, percent_agreement, cohen_kappa}}
            for stat, value in (stats or {}).items():
                if _is_number(value):
                    row[f"{phase}/agreement/{pair}/{stat}"] = value
        for metric, value in ((evaluation.get("benign") or {}).get("overall") or {}).items():
            if _is_number(value):
                row[f"{phase}/benign/{metric}"] = value
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
    total = (record.get("data_overlap") or {}).get("total") or {}
    for column in OVERLAP:
        if _is_number(total.get(column.split("/", 1)[1])):
            row[column] = total[column.split("/", 1)[1]]
    return row


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def choose_harm_metric(frame: pd.DataFrame, wanted: str | None = None) -> str:
    """The column ``final/harm/<metric>`` to show: ``wanted``, else the first of HARM_METRICS present."""
    found = sorted(c.split("/", 2)[2] for c in frame if c.startswith("final/harm/"))
    wanted = RENAMED.get(wanted, wanted)
    if wanted:
        if wanted not in found:
            raise KeyError(f"Harmfulness metric {wanted!r} is in no result; found: {found}")
        return f"harm/{wanted}"
    available = [m for m in HARM_METRICS if m in found and frame[f"final/harm/{m}"].notna().any()]
    if not available:
        raise KeyError(f"No harmfulness metric in the results (looked for {list(HARM_METRICS)}; found {found}).")
    return f"harm/{available[0]}"


def is_proxy(metric: str) -> bool:
    """Whether a harm metric comes from the offline judges (topicality, keywords) rather than a harm judge."""
    return metric.split("/")[-1] in PROXY_METRICS


def metric_label(metric: str) -> str:
    """A harm metric's name as shown: ``on_topic_compliance (proxy)`` for an offline one."""
    name = metric.split("/")[-1]
    return f"{name} (proxy)" if is_proxy(name) else name


def harm_header(frame: pd.DataFrame, metric: str) -> str:
    """The report's sentence on what the harm column is, and whether any harm judge ran."""
    judged = [m for m in HARM_METRICS if not is_proxy(m) and f"final/harm/{m}" in frame
              and frame[f"final/harm/{m}"].notna().any()]
    if not is_proxy(metric):
        return f"Harmfulness: `{metric_label(metric)}`, from a harm judge."
    if judged:
        return (f"Harm column: `{metric_label(metric)}`, chosen with --harm-metric: an offline proxy, not harmfulness "
                f"(a harm judge ran: {', '.join(judged)}).")
    return (f"**No harm judge ran** (rubric, StrongREJECT, safety classifier or moderation), so the harm column is "
            f"`{metric_label(metric)}`: the share of answers that are on topic (relevance encoder) and not refused "
            "(keywords). It measures topicality, not harm, and is circular for SDD (the same encoder and threshold "
            "build SDD's training pairs). Enable a judge (eval.judges.<name>.enabled=true) for harmfulness.")


def benign_metrics(frame: pd.DataFrame) -> list[str]:
    """The benign columns present in the results (``benign/<metric>``)."""
    return [f"benign/{m}" for m in BENIGN_COLUMNS
            if any(c in frame for c in (f"before_attack/benign/{m}", f"final/benign/{m}"))]


def capability_tasks(frame: pd.DataFrame) -> list[str]:
    return sorted({c.split("/", 1)[1] for c in frame if c.startswith("before_attack/capability/")} - {AVERAGE})


def table1(frame: pd.DataFrame, harm_metric: str) -> str:
    """Per backbone: each defense with no attack, then under each attack; capability per task with the
    relative drop from the defended model in parentheses, the harm metric, the benign columns and the
    point's train/evaluation overlap (exact/near-duplicate prompts, 0 expected)."""
    tasks = capability_tasks(frame)
    benign = benign_metrics(frame)
    lines = []
    for backbone, group in frame.groupby("backbone", sort=True):
        header = ["model", *[t.split("/", 1)[1] for t in tasks], "capability avg", metric_label(harm_metric),
                  *[BENIGN_COLUMNS[b.split("/", 1)[1]] for b in benign], "train/eval overlap"]
        lines += [f"### {backbone}", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        for defense, rows in group.groupby("defense", sort=False):
            name = "Vanilla" if defense == NO_ATTACK else defense
            base = _defended_row(rows)
            if base is not None:
                cells = [_fmt(base.get(f"before_attack/{t}")) for t in tasks]
                cells += [_fmt(base.get(f"before_attack/{AVERAGE}")), _fmt(base.get(f"before_attack/{harm_metric}"))]
                cells += [_fmt(base.get(f"before_attack/{b}")) for b in benign] + [_overlap(base)]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            for _, row in rows[rows["attack"] != NO_ATTACK].iterrows():
                cells = [_with_drop(row.get(f"final/{t}"), row.get(f"before_attack/{t}")) for t in tasks]
                cells += [_with_drop(row.get(f"final/{AVERAGE}"), row.get(f"before_attack/{AVERAGE}")),
                          _fmt(row.get(f"final/{harm_metric}"))]
                cells += [_fmt(row.get(f"final/{b}")) for b in benign] + [_overlap(row)]
                lines.append(f"| {name} under {row['attack_label']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _overlap(row: Any) -> str:
    """``exact/near`` overlapping evaluation prompts of a point, or — for results without the check."""
    exact, near = (row.get(c) for c in OVERLAP)
    if exact is None or pd.isna(exact):
        return "—"
    return f"{int(exact)}/{int(near)}"


def overlapping_points(frame: pd.DataFrame) -> list[str]:
    """The run folders of points whose data_overlap total is not zero."""
    present = [c for c in OVERLAP if c in frame]
    if not present:
        return []
    return list(frame.loc[frame[present].fillna(0).sum(axis=1) > 0, "run_dir"])


def agreement_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Judge agreement per point and phase: percent agreement and Cohen's kappa on the shared items."""
    out = []
    for _, row in frame.iterrows():
        for phase in ("before_attack", "after_attack"):
            prefix = f"{phase}/agreement/"
            pairs = sorted({c[len(prefix):].rsplit("/", 1)[0] for c in frame if c.startswith(prefix)})
            for pair in pairs:
                kappa, percent = row.get(f"{prefix}{pair}/cohen_kappa"), row.get(f"{prefix}{pair}/percent_agreement")
                if (kappa is None or pd.isna(kappa)) and (percent is None or pd.isna(percent)):
                    continue
                out.append({"backbone": row["backbone"], "defense": row["defense"], "attack": row["attack_label"],
                            "evaluation": phase, "judges": pair.replace("|", " vs "),
                            "items": row.get(f"{prefix}{pair}/num_items"), "% agreement": percent, "Cohen's κ": kappa})
    return pd.DataFrame(out)


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
            f"worst {metric_label(harm_metric)}": None if worst is None else worst[f"final/{harm_metric}"],
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
    axis.set_ylabel(metric_label(harm_metric))
    axis.set_title(("On-topic compliance (a proxy, not harm)" if is_proxy(harm_metric) else "Harmfulness")
                   + " vs capability after each attack")
    axis.legend(fontsize=7, loc="best", ncol=2)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)


def write_report(sweep_dir: Path, harm_metric: str | None = None, max_drop: float = 10.0) -> dict[str, Any]:
    """Write results.csv, report.md and harm_vs_capability.png into ``<sweep_dir>/report``.

    Returns:
        ``{"csv", "markdown", "figure"}`` paths, and ``unreadable``: the results.json files left out
        (path and reason), empty when every point was read.
    """
    sweep_dir = Path(sweep_dir)
    frame, unreadable = collect(sweep_dir)
    metric = choose_harm_metric(frame, harm_metric)
    out = sweep_dir / "report"
    out.mkdir(exist_ok=True)
    paths = {"csv": out / "results.csv", "markdown": out / "report.md", "figure": out / "harm_vs_capability.png"}
    frame.to_csv(paths["csv"], index=False)
    worst = worst_case(frame, metric, max_drop)
    markdown = [f"# Sweep report: {sweep_dir}", ""]
    if unreadable:
        markdown += [f"**{len(unreadable)} results.json could not be read and are not in this report:**", "",
                     *[f"- {line}" for line in unreadable], ""]
    markdown += [
        f"{len(frame)} points. {harm_header(frame, metric)}", "",
        "Capability: accuracy (%) per task; in parentheses, the drop relative to the same defended model before "
        "the attack. Benign columns (held-out benign prompts): on-topic rate and over-refusal are proxies "
        "(relevance encoder, refusal keywords); reference NLL is the model's mean NLL per token of the reference "
        "answers (lower is better). Train/eval overlap: evaluation prompts with an exact / near-duplicate match in "
        "the point's training data (0/0 expected; see data_overlap in the point's results.json).", "",
    ]
    overlapping = overlapping_points(frame)
    if overlapping:
        markdown += [f"**{len(overlapping)} point(s) evaluate on prompts that overlap their training data** (see "
                     "data_overlap in their results.json): " + ", ".join(overlapping), ""]
    markdown += ["## Capability, harmfulness and benign behaviour (the shape of the SDD paper's Table 1)", "",
                 table1(frame, metric)]
    agreement = agreement_table(frame)
    if not agreement.empty:
        markdown += ["## Judge agreement", "",
                     "Percent agreement and Cohen's κ of each pair of harm judges on the items both judged.", "",
                     _markdown_table(agreement), ""]
    markdown += [
        f"## Utility-constrained worst case (capability drop <= {max_drop:g}%)", "",
        "Per defense, the most harmful attack among those that keep the model useful: an attacker who wants a "
        "capable harmful model gets at most this. No attack within budget means every attack cost more "
        "capability than the budget.", "",
        _markdown_table(worst), "",
    ]
    paths["markdown"].write_text("\n".join(markdown))
    plot(frame, metric, paths["figure"])
    return {**paths, "unreadable": unreadable}


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


def main(argv: Sequence[str] | None = None) -> int:
    """``report.py``: write the report; 1 when a results.json could not be read (the others are reported)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Tables and a figure from a pipeline sweep's results.json files.")
    parser.add_argument("sweep_dir", type=Path, help="a pipeline.py run or multirun folder")
    parser.add_argument("--harm-metric", default=None, help=f"default: the first present of {list(HARM_METRICS)}")
    parser.add_argument("--max-drop", type=float, default=10.0,
                        help="capability budget of the worst case, in %% of the defended model's average")
    args = parser.parse_args(argv)
    try:
        written = write_report(args.sweep_dir, args.harm_metric, args.max_drop)
    except (FileNotFoundError, KeyError) as error:
        print(f"report.py: {error.args[0] if error.args else error}", file=sys.stderr)
        return 1
    print(written["markdown"].read_text())
    print("\n".join(f"{kind}: {written[kind]}" for kind in ("csv", "markdown", "figure")))
    if written["unreadable"]:
        print(f"report.py: {len(written['unreadable'])} results.json could not be read and are not in the report: "
              + "; ".join(written["unreadable"]), file=sys.stderr)
        return 1
    return 0
