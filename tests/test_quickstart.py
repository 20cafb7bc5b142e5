"""`make quickstart`'s sweep (experiment=quickstart) on the tiny backbone: four points share their stages and the
verdict table is printed at the end, with the paths of the report and its figures (~50 s on 2 busy cores)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import offline_env

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["Vanilla", "Vanilla under mft_advbench", "sdd", "sdd under mft_advbench"]


def test_the_quickstart_prints_the_verdict_table(tmp_path):
    env = offline_env(tmp_path / "cache")
    result = subprocess.run(
        [
            sys.executable,
            "pipeline.py",
            "-m",
            "experiment=quickstart",
            "point.backbone=tiny_llama",
            f"paths.log_dir={tmp_path / 'logs'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    verdict = out[out.index("Verdict on tiny_llama") :]
    lines = verdict.splitlines()
    assert "harmful prompts (n=24)" in lines[1] and "benign prompts (n=24)" in lines[1]
    assert re.sub(r"\s+", " ", lines[2]) == (
        "model | refusal %* irrelevant %* on-topic compliance %* | on-topic %* over-refusal %* reference NLL"
    )
    rows = {line.split("|")[0].strip(): line for line in lines[4:8]}
    assert list(rows) == MODELS
    for line in rows.values():  # three harmful-prompt and three benign-prompt numbers per row
        harmful, benign = line.split("|")[1].split(), line.split("|")[2].split()
        assert len(harmful) == 3 and len(benign) == 3 and all(re.fullmatch(r"\d+\.\d+", v) for v in harmful + benign)
    assert "* proxy." in verdict and "Reference NLL = mean negative log-likelihood" in verdict
    sweep = next((tmp_path / "logs" / "quickstart" / "multiruns").iterdir())
    for name in ("report.md", "harm_heatmap.png", "harm_vs_capability.png"):
        assert str(sweep / "report" / name) in verdict and (sweep / "report" / name).exists()

    # One defended model and one evaluation per model: the points share their stages.
    stages = tmp_path / "logs" / "stages"
    finished = {kind: len(list((stages / kind).glob("*/stage.json"))) for kind in ("defense", "attack", "evaluate")}
    assert finished == {"defense": 1, "attack": 2, "evaluate": 4}
    assert "💡" not in out + result.stderr and (out + result.stderr).count("Seed set to 0") == 3  # three trainings


def readme_command(start: str) -> list[str]:
    """The README's command line that begins with ``start``, continuation lines joined, as arguments."""
    import shlex

    text = (ROOT / "README.md").read_text()
    begin = text.index(start)
    end = text.index("\n```", begin)
    return shlex.split(text[begin:end].replace("\\\n", " "))


def test_the_readme_command_for_a_real_backbone_runs_the_papers_recipes(tmp_path, monkeypatch):
    """Every stage of the README's real-backbone quickstart: SDD's paper recipe, MFT's own, the full evaluation."""
    from conftest import compose_config
    from test_resolved_config import ATTACKS, SDD_RECIPE, mismatches, running_values

    from sdd.pipeline import StagePlanner, hydra_context

    arguments = readme_command("python pipeline.py -m experiment=quickstart point.backbone=llama2_7b_chat")
    overrides = arguments[arguments.index("-m") + 1 :]
    monkeypatch.setattr("sdd.pipeline.resolve_backbone", lambda backbone: f"/models/{backbone.name}")  # no Hub
    for defense in ("none", "sdd"):
        point = compose_config(
            "pipeline",
            [*overrides, f"point.defense={defense}", "point.attack=mft_advbench"],
            log_dir=tmp_path,
            cache_dir=tmp_path / "cache",
            output_dir=tmp_path / "run",
        )
        with hydra_context():
            stages = StagePlanner(point, tmp_path / "stages").plan()
        if defense == "sdd":
            trained = stages["defense"].cfg
            assert mismatches(running_values(trained), SDD_RECIPE) == {}
            assert trained.backbone.name == "llama2_7b_chat" and trained.trainer.accelerator == "gpu"
            assert trained.module.gradient_checkpointing
            assert trained.corpus.harmful.path == "/data/beavertails/beavertails_sample_14cat.csv"  # corpus=local
        attack = stages["attack"].cfg
        assert mismatches(running_values(attack), ATTACKS["mft_advbench"]) == {}
        assert attack.module.gradient_checkpointing and attack.trainer.accelerator == "gpu"
        evaluation = stages["evaluate_after_attack"].cfg.eval
        assert evaluation.harmfulness.max_prompts_per_set is None and evaluation.harmfulness.max_new_tokens == 256
        assert evaluation.judges.rubric.enabled
