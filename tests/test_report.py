"""report.py on pipeline results the test writes: CSV, Table-1 shape, utility-constrained worst case, figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from sdd.report import write_report

ROOT = Path(__file__).resolve().parents[1]


def evaluation(mmlu: float, openbookqa: float, harmfulness_score: float, compliance: float) -> dict:
    return {
        "harmfulness": {"overall": {"num_prompts": 10, "harmfulness_score": harmfulness_score,
                                    "on_topic_compliance": compliance}},
        "capability": {"mmlu": {"acc": mmlu, "acc_norm": None, "num_samples": 100},
                       "openbookqa": {"acc": openbookqa, "acc_norm": 0.5, "num_samples": 100},
                       "lm_eval_version": "0.4"},
    }


def write_point(folder: Path, defense: str, attack: str, before: dict, after: dict | None, setting: str | None = None):
    folder.mkdir(parents=True)
    record = {
        "point": {"name": f"b/{defense}/{attack}", "backbone": "llama", "defense": defense, "attack": attack,
                  "attack_setting": setting, "seed": 0},
        "stages": {}, "evaluations": {"before_attack": before, **({"after_attack": after} if after else {})},
    }
    (folder / "results.json").write_text(json.dumps(record))


@pytest.fixture
def sweep(tmp_path):
    """Vanilla and SDD, defended capability 50 (MMLU 40, OBQA 60), under no attack, two MFT settings and BFT."""
    base = evaluation(0.40, 0.60, 1.0, 0.0)
    points = [
        ("none", "none", None, None),
        ("none", "mft", "1", evaluation(0.38, 0.56, 4.8, 90.0)),   # capability 47: drop 6%
        ("none", "mft", "2", evaluation(0.37, 0.55, 4.9, 95.0)),   # capability 46: drop 8%
        ("sdd", "none", None, None),
        ("sdd", "mft", "1", evaluation(0.20, 0.40, 4.5, 80.0)),    # capability 30: drop 40%, outside the budget
        ("sdd", "mft", "2", evaluation(0.39, 0.57, 2.0, 20.0)),    # capability 48: drop 4%
        ("sdd", "bft", None, evaluation(0.41, 0.57, 1.2, 5.0)),    # capability 49: drop 2%
    ]
    for index, (defense, attack, setting, after) in enumerate(points):
        write_point(tmp_path / "multirun" / str(index), defense, attack, base, after, setting)
    (tmp_path / "multirun" / "0" / "stray.json").write_text("{}")
    return tmp_path / "multirun"


def test_csv_has_one_row_per_point_with_drops(sweep):
    paths = write_report(sweep)
    frame = pd.read_csv(paths["csv"])
    assert len(frame) == 7
    row = frame[(frame.defense == "sdd") & (frame.attack_label == "mft#1")].iloc[0]
    assert row["final/capability/average"] == pytest.approx(30.0)
    assert row["capability_drop_pct"] == pytest.approx(40.0)
    assert row["final/harm/harmfulness_score"] == 4.5
    no_attack = frame[(frame.defense == "sdd") & (frame.attack == "none")].iloc[0]
    assert no_attack["final/capability/average"] == pytest.approx(50.0) and no_attack["capability_drop_pct"] == 0


def test_table_one_shows_each_defense_and_its_attacked_rows_with_relative_drops(sweep):
    markdown = write_report(sweep)["markdown"].read_text()
    assert "| model | mmlu | openbookqa | capability avg | harmfulness_score |" in markdown
    assert "| Vanilla | 40.00 | 60.00 | 50.00 | 1.00 |" in markdown
    assert "| sdd under mft#1 | 20.00 (50%) | 40.00 (33%) | 30.00 (40%) | 4.50 |" in markdown


def test_worst_case_takes_the_most_harmful_attack_within_the_capability_budget(sweep):
    markdown = write_report(sweep)["markdown"].read_text()
    worst = markdown.split("## Utility-constrained worst case")[1]
    assert "| llama | sdd | 2.00 | mft#2 | 4.00 | 2/3 |" in worst  # mft#1 (4.5) cost 40%: not admissible
    assert "| llama | none | 4.90 | mft#2 | 8.00 | 2/2 |" in worst
    tight = write_report(sweep, max_drop=5.0)["markdown"].read_text().split("## Utility-constrained worst case")[1]
    assert "| llama | none | — | — | — | 0/2 |" in tight


def test_the_figure_is_a_png_and_a_metric_can_be_chosen(sweep):
    paths = write_report(sweep, harm_metric="on_topic_compliance")
    assert paths["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Harmfulness: `on_topic_compliance`" in paths["markdown"].read_text()
    with pytest.raises(KeyError, match="found"):
        write_report(sweep, harm_metric="no_such_metric")


def test_a_folder_without_pipeline_results_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="pipeline.py run or multirun"):
        write_report(tmp_path)


def test_the_command_line_prints_the_report(sweep):
    result = subprocess.run([sys.executable, "report.py", str(sweep), "--max-drop", "10"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Utility-constrained worst case" in result.stdout and "harm_vs_capability.png" in result.stdout
