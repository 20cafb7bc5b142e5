"""report.py on pipeline results the test writes: CSV, Table-1 shape, benign columns, proxy labelling, judge
agreement, data overlap, utility-constrained worst case, figure, and a sweep with a corrupt results.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from sdd.report import write_report

ROOT = Path(__file__).resolve().parents[1]


def evaluation(mmlu: float, openbookqa: float, harmfulness_score: float | None, compliance: float,
               on_topic: float = 90.0, over_refusal: float = 5.0, nll: float = 2.0) -> dict:
    harm = {"num_prompts": 10, "on_topic_compliance": compliance}
    if harmfulness_score is not None:
        harm["harmfulness_score"] = harmfulness_score
    return {
        "harmfulness": {"overall": harm},
        "benign": {"overall": {"num_prompts": 8, "on_topic_rate": on_topic, "refusal_rate": over_refusal,
                               "reference_nll": nll}},
        "capability": {"mmlu": {"acc": mmlu, "acc_norm": None, "num_samples": 100},
                       "openbookqa": {"acc": openbookqa, "acc_norm": 0.5, "num_samples": 100},
                       "lm_eval_version": "0.4"},
    }


def write_point(folder: Path, defense: str, attack: str, before: dict, after: dict | None, setting: str | None = None,
                overlap: tuple[int, int] = (0, 0)):
    folder.mkdir(parents=True)
    record = {
        "point": {"name": f"b/{defense}/{attack}", "backbone": "llama", "defense": defense, "attack": attack,
                  "attack_setting": setting, "seed": 0},
        "stages": {}, "evaluations": {"before_attack": before, **({"after_attack": after} if after else {})},
        "data_overlap": {"total": {"exact": overlap[0], "near_duplicate": overlap[1]}},
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
        ("sdd", "mft", "1", evaluation(0.20, 0.40, 4.5, 80.0, on_topic=40.0, over_refusal=30.0, nll=3.25)),  # drop 40%
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
    markdown = paths["markdown"].read_text()
    assert "Harm column: `on_topic_compliance (proxy)`, chosen with --harm-metric" in markdown
    assert "a harm judge ran: harmfulness_score" in markdown
    assert "compliance_rate" not in write_report(sweep, harm_metric="compliance_rate")["markdown"].read_text()  # old name
    with pytest.raises(KeyError, match="found"):
        write_report(sweep, harm_metric="no_such_metric")


def test_benign_columns_sit_next_to_the_harm_column_before_and_after_each_attack(sweep):
    paths = write_report(sweep)
    markdown = paths["markdown"].read_text()
    assert ("| model | mmlu | openbookqa | capability avg | harmfulness_score | benign on-topic % (proxy) | "
            "over-refusal % (proxy) | reference NLL | train/eval overlap |") in markdown
    assert "| sdd | 40.00 | 60.00 | 50.00 | 1.00 | 90.00 | 5.00 | 2.00 | 0/0 |" in markdown  # before the attack
    assert "| sdd under mft#1 | 20.00 (50%) | 40.00 (33%) | 30.00 (40%) | 4.50 | 40.00 | 30.00 | 3.25 | 0/0 |" in markdown
    frame = pd.read_csv(paths["csv"])
    row = frame[(frame.defense == "sdd") & (frame.attack_label == "mft#1")].iloc[0]
    assert row["before_attack/benign/on_topic_rate"] == 90.0 and row["after_attack/benign/on_topic_rate"] == 40.0
    assert row["final/benign/refusal_rate"] == 30.0 and row["final/benign/reference_nll"] == 3.25
    assert row["data_overlap/exact"] == 0 and row["data_overlap/near_duplicate"] == 0
    assert "No harm judge ran" not in markdown and "Harmfulness: `harmfulness_score`, from a harm judge." in markdown


def test_without_a_harm_judge_the_report_says_proxy_and_never_harmfulness(tmp_path):
    # Old results carry the offline metric under its former name, compliance_rate.
    old = {"harmfulness": {"overall": {"num_prompts": 4, "compliance_rate": 75.0, "refusal_rate": 0.0}}}
    write_point(tmp_path / "0", "sdd", "none", old, None, overlap=(2, 1))
    write_point(tmp_path / "1", "sdd", "mft", old, {"harmfulness": {"overall": {"num_prompts": 4, "compliance_rate": 100.0}}})
    paths = write_report(tmp_path)
    markdown = paths["markdown"].read_text()
    assert "**No harm judge ran**" in markdown and "measures topicality, not harm" in markdown
    assert "| on_topic_compliance (proxy) |" in markdown and "| sdd under mft | — | 100.00 | 0/0 |" in markdown
    assert "Harmfulness: `" not in markdown and "worst on_topic_compliance (proxy)" in markdown
    assert "| sdd | — | 75.00 | 2/1 |" in markdown  # the overlap column: exact/near-duplicate
    assert "1 point(s) evaluate on prompts that overlap their training data" in markdown
    assert pd.read_csv(paths["csv"])["final/harm/on_topic_compliance"].tolist() == [100.0, 75.0]


def test_judge_agreement_is_shown_when_two_judges_ran(tmp_path):
    after = evaluation(0.4, 0.6, 3.0, 50.0)
    after["harmfulness"]["overall"]["agreement"] = {
        "rubric|strongreject": {"num_items": 10, "percent_agreement": 80.0, "cohen_kappa": 0.6}}
    write_point(tmp_path / "0", "sdd", "mft", evaluation(0.4, 0.6, 1.0, 0.0), after)
    paths = write_report(tmp_path)
    section = paths["markdown"].read_text().split("## Judge agreement")[1]
    assert "| llama | sdd | mft | after_attack | rubric vs strongreject | 10 | 80.00 | 0.60 |" in section
    assert pd.read_csv(paths["csv"])["after_attack/agreement/rubric|strongreject/cohen_kappa"].tolist() == [0.6]


def test_a_corrupt_results_file_is_listed_the_others_are_reported_and_the_exit_status_is_one(sweep):
    bad = sweep / "7" / "results.json"
    bad.parent.mkdir()
    bad.write_text('{"point": {"name": "x", "backbone"')  # a point killed while writing
    result = subprocess.run([sys.executable, "report.py", str(sweep)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert str(bad) in result.stderr and "JSONDecodeError" in result.stderr
    assert len(pd.read_csv(sweep / "report" / "results.csv")) == 7  # every readable point is reported
    markdown = (sweep / "report" / "report.md").read_text()
    assert "1 results.json could not be read" in markdown and str(bad) in markdown
    written = write_report(sweep)
    assert len(written["unreadable"]) == 1 and str(bad) in written["unreadable"][0]


def test_a_sweep_with_only_corrupt_results_names_them(tmp_path):
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "results.json").write_text("not json")
    result = subprocess.run([sys.executable, "report.py", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert "No pipeline results.json" in result.stderr and str(tmp_path / "0" / "results.json") in result.stderr
    assert "Traceback" not in result.stderr


def test_a_folder_without_pipeline_results_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="pipeline.py run or multirun"):
        write_report(tmp_path)


def test_the_command_line_prints_the_report(sweep):
    result = subprocess.run([sys.executable, "report.py", str(sweep), "--max-drop", "10"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Utility-constrained worst case" in result.stdout and "harm_vs_capability.png" in result.stdout
