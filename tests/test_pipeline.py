"""pipeline.py: experiments compose into valid stages, a point runs end to end, finished stages are reused,
every defense runs in tiny_matrix, and the report reads what the points write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import CONF_DIR, compose_config, offline_env
from omegaconf import OmegaConf

from sdd.conf_options import sweep_params
from sdd.pipeline import NONE, STAGE_RECORD, StagePlanner, hydra_context, override_value, run_pipeline

# Small evaluations: the tiny model's answers and accuracies are noise; the shape is what is tested.
QUICK_EVAL = (
    'stages.overrides.evaluate=["eval.harmfulness.max_prompts_per_set=4","eval.harmfulness.max_new_tokens=4",'
    '"eval.capability.enabled=true"]'
)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def pipeline_experiments() -> list[str]:
    return [
        e
        for e in options("experiment")
        if "point" in yaml.safe_load((CONF_DIR / "experiment" / f"{e}.yaml").read_text())
    ]


def sweep_values(text: str) -> list[str]:
    """The values of a sweep parameter as Hydra parses it: ``a,b,c``, ``choice(...)``, ``range(start,stop)``;
    an Optuna interval (``tag(log, interval(lo, hi))``): its two ends."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    override = OverridesParser.create().parse_override(f"key={text}")
    if override.is_interval_sweep():
        return [str(override.value().start), str(override.value().end)]
    return list(override.sweep_string_iterator())


def point_config(tmp_path, cache_dir, *overrides, run="run"):
    return compose_config(
        "pipeline",
        ["experiment=tiny_matrix", QUICK_EVAL, *overrides],
        log_dir=tmp_path / "logs",
        cache_dir=cache_dir,
        output_dir=tmp_path / run,
    )


def test_pipeline_and_training_experiments_are_told_apart():
    assert {"tiny_matrix", "paper_table1", "sdd_efficiency", "sdd_reject", "seam_grid"} <= set(pipeline_experiments())
    assert {"quick_tiny", "sdd_paper"}.isdisjoint(pipeline_experiments())


@pytest.mark.parametrize("experiment", pipeline_experiments())
def test_every_point_of_every_experiment_composes_into_valid_stages(experiment, tmp_path, monkeypatch):
    cfg = compose_config(
        "pipeline",
        [f"experiment={experiment}"],
        log_dir=tmp_path,
        cache_dir=tmp_path / "cache",
        output_dir=tmp_path / "run",
    )
    params = sweep_params(experiment)  # ${sdd.options:<group>} expanded, as Hydra's sweeper sees it
    sweep = {key: sweep_values(value) for key, value in params.items()}
    for value in sweep.get("point.defense", []):
        assert value == NONE or value in options("defense"), f"{experiment}: unknown defense {value}"
    for value in sweep.get("point.attack", []):  # an attack or a chain of them (a+b)
        assert value == NONE or set(value.split("+")) <= set(options("attack")), f"{experiment}: unknown attack {value}"
    for value in sweep.get("point.backbone", []):
        assert value in options("backbone"), f"{experiment}: unknown backbone {value}"
    for setting in cfg.attack_settings.values():
        assert set(setting.attack.split("+")) <= set(options("attack"))

    # Vanilla points resolve their backbone (a download for Hub backbones): only names are needed here.
    monkeypatch.setattr("sdd.pipeline.resolve_backbone", lambda backbone: f"/models/{backbone.name}")
    # Every value of every sweep parameter, the others at their first value (stage overrides do not interact).
    first = {key: values[0] for key, values in sweep.items()}
    points = {tuple(sorted({**first, key: value}.items())) for key, values in sweep.items() for value in values}
    for choice in sorted(points):
        point = compose_config(
            "pipeline",
            [f"experiment={experiment}", *[f"{k}={v}" for k, v in choice]],
            log_dir=tmp_path,
            cache_dir=tmp_path / "cache",
            output_dir=tmp_path / "run",
        )
        with hydra_context():
            stages = StagePlanner(point, tmp_path / "stages").plan()  # composes every stage's config
        for stage in stages.values():
            OmegaConf.resolve(stage.cfg)


def test_seam_grid_holds_the_eleven_attacks_of_the_slides(tmp_path):
    cfg = compose_config("pipeline", ["experiment=seam_grid"], output_dir=tmp_path)
    grid = {}
    for name, setting in cfg.attack_settings.items():
        values = dict(o.split("=", 1) for o in setting.overrides)
        grid[int(name)] = (
            int(values["data.num_examples"]),
            "PEFT" if setting.attack.endswith("lora") else "SFT",
            values["optimizer"],
            float(values["optimizer.lr"]),
        )
    assert grid == {
        1: (1000, "SFT", "adamw", 2e-5),
        2: (1000, "SFT", "adamw", 5e-5),
        3: (1000, "SFT", "adamw", 8e-5),
        4: (1000, "SFT", "adamw", 1e-4),
        5: (1000, "SFT", "adamw", 2e-4),
        6: (10000, "SFT", "adamw", 5e-5),
        7: (10000, "SFT", "adamw", 1e-4),
        8: (10000, "PEFT", "adamw", 5e-5),
        9: (10000, "PEFT", "adamw", 1e-4),
        10: (10000, "SFT", "sgd", 5e-5),
        11: (10000, "SFT", "sgd", 1e-4),
    }


def test_a_point_runs_end_to_end_and_a_second_run_trains_nothing(tmp_path, cache_dir, monkeypatch):
    first = run_pipeline(point_config(tmp_path, cache_dir, "point.defense=sdd", "point.attack=mft_advbench"))
    assert set(first["stages"]) == {"defense", "evaluate_before_attack", "attack", "evaluate_after_attack"}
    assert first["reused_stages"] == []
    assert first["stages"]["defense"]["global_step"] == 6 and first["stages"]["attack"]["global_step"] == 6
    for phase in ("before_attack", "after_attack"):
        assert first["evaluations"][phase]["harmfulness"]["overall"]["num_prompts"] == 4
        assert 0.0 <= first["evaluations"][phase]["capability"]["mmlu"]["acc"] <= 1.0
    # The attack trained the defended model, and the evaluation read the attacked one.
    assert first["stages"]["attack"]["overrides"].count(f"model={first['stages']['defense']['model_dir']}") == 1
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["point"]["name"] == "tiny_llama/sdd/mft_advbench"
    assert saved["data_overlap"]["total"] == {"exact": 0, "near_duplicate": 0}  # clean splits by construction
    assert saved["evaluations"]["after_attack"]["benign"]["overall"]["num_prompts"] == 4

    def must_not_run(cfg):
        raise AssertionError("a finished stage was computed again")

    monkeypatch.setattr("sdd.training.train", must_not_run)
    monkeypatch.setattr("sdd.evaluation.run.evaluate", must_not_run)
    second = run_pipeline(
        point_config(tmp_path, cache_dir, "point.defense=sdd", "point.attack=mft_advbench", run="again")
    )
    assert second["reused_stages"] == sorted(first["stages"])
    assert second["evaluations"] == first["evaluations"]


def test_a_changed_attack_reuses_the_defense_and_a_failed_stage_is_run_again(tmp_path, cache_dir, monkeypatch):
    run_pipeline(point_config(tmp_path, cache_dir, "point.defense=sdd", "point.attack=none"))
    import sdd.evaluation.run

    real_evaluate = sdd.evaluation.run.evaluate
    calls = []

    def crash_after_attack(cfg):
        calls.append(cfg.paths.output_dir)
        raise RuntimeError("killed during evaluation")

    monkeypatch.setattr("sdd.evaluation.run.evaluate", crash_after_attack)
    with pytest.raises(RuntimeError, match="killed"):
        run_pipeline(point_config(tmp_path, cache_dir, "point.defense=sdd", "point.attack=bft_sharegpt"))
    assert len(calls) == 1  # the defended model's evaluation was reused; the attacked one's crashed
    assert not (Path(calls[0]) / STAGE_RECORD).exists()

    monkeypatch.setattr("sdd.evaluation.run.evaluate", real_evaluate)
    resumed = run_pipeline(point_config(tmp_path, cache_dir, "point.defense=sdd", "point.attack=bft_sharegpt"))
    assert resumed["reused_stages"] == ["attack", "defense", "evaluate_before_attack"]
    assert (Path(calls[0]) / STAGE_RECORD).exists()


@pytest.mark.parametrize("defense", options("defense"))
def test_every_defense_runs_a_few_steps_in_tiny_matrix(defense, tmp_path, cache_dir):
    record = run_pipeline(
        point_config(
            tmp_path,
            cache_dir,
            f"point.defense={defense}",
            "point.attack=none",
            'stages.overrides.evaluate=["eval.harmfulness.max_prompts_per_set=2",'
            '"eval.harmfulness.max_new_tokens=2","eval.capability.enabled=false",'
            '"eval.judges.relevance.enabled=false"]',
        )
    )
    assert record["stages"]["defense"]["global_step"] == 6
    assert Path(record["stages"]["defense"]["model_dir"], "config.json").exists()
    assert record["evaluations"]["before_attack"]["harmfulness"]["overall"]["num_prompts"] == 2


def test_an_unknown_attack_setting_names_the_known_ones(tmp_path):
    cfg = compose_config("pipeline", ["experiment=seam_grid", "point.attack_setting=12"], output_dir=tmp_path)
    with pytest.raises(KeyError, match=r"attack_settings \(known: \['1', '10', '11', '2'"):
        run_pipeline(cfg)


@pytest.mark.parametrize("value", ["plain", "/a/b-c/model", "two words", "it's", "1e-5", "null", "a=b"])
def test_override_values_read_back_unchanged(value):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_override(f"key={override_value(value)}")
    assert parsed.value() == value


@pytest.mark.slow
def test_the_whole_tiny_matrix_sweep_and_its_report(tmp_path):
    """Every defense x every attack of tiny_matrix as one multirun, then report.py on it."""
    import subprocess
    import sys

    root = CONF_DIR.parent
    env = offline_env(tmp_path / "cache")
    result = subprocess.run(
        [sys.executable, "pipeline.py", "-m", "experiment=tiny_matrix", f"paths.log_dir={tmp_path / 'logs'}"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=7200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = next((tmp_path / "logs" / "tiny_matrix" / "multiruns").iterdir())
    params = sweep_params("tiny_matrix")
    expected = len(sweep_values(params["point.defense"])) * len(sweep_values(params["point.attack"]))
    report = subprocess.run(
        [sys.executable, "report.py", str(sweep_dir)], cwd=root, capture_output=True, text=True, timeout=600
    )
    assert report.returncode == 0, report.stderr[-3000:]
    import pandas as pd

    frame = pd.read_csv(sweep_dir / "report" / "results.csv")
    variants = frame[frame["attack_variant"].notna()]  # one more row per evaluation-time variant of a point
    frame = frame[frame["attack_variant"].isna()]
    assert len(frame) == expected and len(variants) > 0
    assert frame["final/capability/average"].notna().all() and frame["final/harm/on_topic_compliance"].notna().all()
    assert frame["final/benign/reference_nll"].notna().all() and (frame["data_overlap/exact"] == 0).all()
    assert "on_topic_compliance (proxy)" in (sweep_dir / "report" / "report.md").read_text()
