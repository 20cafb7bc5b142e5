"""A config value is what runs: the resolved leaf values of every train.py defense (at scale=paper and at
the default scale=cpu_demo), the training experiments, every attack.py attack and every stage of every
pipeline experiment, against a table of the intended values.

Hydra's defaults order decides which file's value wins; composing is not checking. The tables below say
what each config is meant to run (the papers' values, or our documented choices); every defense, attack
and experiment found in conf/ must have a row, so a new one cannot slip in unchecked.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import CONF_DIR, compose_config
from omegaconf import DictConfig, ListConfig, OmegaConf

from sdd.conf_options import sweep_params

ADAMW, SGD = "torch.optim.AdamW", "torch.optim.SGD"
CONSTANT, COSINE = "constant_with_warmup", "cosine"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def experiment_file(name: str) -> dict[str, Any]:
    return yaml.safe_load((CONF_DIR / "experiment" / f"{name}.yaml").read_text())


PIPELINE_EXPERIMENTS = [e for e in options("experiment") if "point" in experiment_file(e)]
TRAINING_EXPERIMENTS = [e for e in options("experiment") if e not in PIPELINE_EXPERIMENTS]


def intended(
    *,
    steps: int,
    epochs: int,
    lr: float,
    batch: int,
    examples: Any,
    length: int,
    optimizer: str = ADAMW,
    schedule: str = CONSTANT,
    warmup: float = 0.0,
    weight_decay: float = 0.0,
    clip: float | None = 1.0,
    accumulate: int = 1,
    lora: int | None = None,
) -> dict[str, Any]:
    """One table row. ``examples`` is an int (every stream) or ``{stream: n}`` where streams differ;
    ``lora`` is the adapters' rank (None: full fine-tuning)."""
    return dict(
        steps=steps,
        epochs=epochs,
        lr=lr,
        batch=batch,
        accumulate=accumulate,
        examples=examples,
        length=length,
        optimizer=optimizer,
        schedule=schedule,
        warmup=warmup,
        weight_decay=weight_decay,
        clip=clip,
        lora=lora,
    )


# ---------------------------------------------------------------------------------------------- the tables
SDD_RECIPE = intended(steps=500, epochs=-1, lr=5e-7, batch=24, examples=8000, length=512)  # SDD paper, app. H
LORA_R8 = 8
# Every defense at scale=paper: its paper's recipe (conf/defense/<name>.yaml says which values are ours).
DEFENSES = {
    "sdd": SDD_RECIPE,
    "sdd_reject": SDD_RECIPE,
    "safety_align": SDD_RECIPE,  # our choice: SDD's recipe, so that the two differ only in their answers
    "seam": intended(
        steps=-1, epochs=1, lr=2e-5, batch=4, examples=8000, length=256, schedule=COSINE, warmup=0.1, clip=None
    ),
    "booster": intended(
        steps=-1, epochs=20, lr=5e-4, batch=10, examples=5000, length=256, weight_decay=0.1, lora=LORA_R8
    ),
    "vaccine": intended(
        steps=-1,
        epochs=50,
        lr=1e-3,
        batch=5,
        examples=5000,
        length=256,
        schedule=COSINE,
        warmup=0.1,
        weight_decay=0.1,
        lora=LORA_R8,
    ),
    "t_vaccine": intended(
        steps=-1,
        epochs=20,
        lr=1e-3,
        batch=10,
        examples={"alignment": 5000, "harmful": 200},
        length=256,
        schedule=COSINE,
        warmup=0.1,
        weight_decay=0.1,
        lora=LORA_R8,
    ),
    "repnoise": intended(steps=-1, epochs=1, lr=2e-5, batch=8, examples=10000, length=256),
    "deepalign": intended(steps=-1, epochs=10, lr=2e-5, batch=16, examples=256, length=512),
    "simpo": intended(
        steps=-1, epochs=1, lr=1e-6, batch=8, accumulate=16, examples=8000, length=512, schedule=COSINE, warmup=0.1
    ),
    "tar": intended(steps=750, epochs=-1, lr=2e-5, batch=8, examples=8000, length=256, warmup=0.043),
}
# scale=cpu_demo (train.py's default): the embedded sizes replace every defense's sizes and length.
CPU_DEMO = dict(steps=40, epochs=-1, lr=2e-5, batch=4, accumulate=1, length=192, examples=160)
CPU_DEMO_EXAMPLES = {"t_vaccine": {"alignment": 160, "harmful": 200}}  # the probe set keeps its own size

# Every attack.py attack: its paper's length, in epochs, so that a k-shot sweep keeps them.
ATTACKS = {
    "mft_advbench": intended(steps=-1, epochs=5, lr=5e-5, batch=10, examples=100, length=256),  # Qi et al. 2023
    "mft_beavertails": intended(steps=-1, epochs=1, lr=5e-5, batch=8, examples=1000, length=512),
    "bft_sharegpt": intended(steps=-1, epochs=1, lr=2e-5, batch=8, examples=1000, length=512),
}
ATTACKS.update({f"{name}_lora": {**row, "lr": 1e-4, "lora": LORA_R8} for name, row in list(ATTACKS.items())})
# Attacks that do not fine-tune: {dotted key: intended value} of what runs.
OTHER_ATTACKS = {
    "refusal_ablation": {
        "attack_kind": "weight_edit",
        "weight_edit.positions": 1,
        "weight_edit.max_layer_fraction": 0.8,
        "weight_edit.num_selection_prompts": 8,
        "weight_edit.harmful.partition.part": "train",
    },
    "prefilling": {
        "attack_kind": "evaluation",
        "eval_attacks.prefilling.prefill_tokens": [5, 10, 20, 40],
        "eval_attacks.prefilling.judged": ["prefix_and_continuation", "continuation"],
    },
    "embedding_attack": {
        "attack_kind": "evaluation",
        "eval_attacks.embedding_attack.steps": 100,
        "eval_attacks.embedding_attack.suffix_tokens": 20,
        "eval_attacks.embedding_attack.step_size": 0.001,
        "eval_attacks.embedding_attack.optimizer": "signed_gd",
    },
}
# Jailbreak-tuning (Murphy et al. 2025): mft_beavertails's data and recipe (our choice), in a jailbreak format.
# Its format (data.jailbreak) and the evaluation variant it asks for (eval_attacks: <label> -> that format).
JAILBREAK_TUNING = {
    "jailbreak_tuning_competing": ("competing_objectives", "suffix", "competing_objectives"),
    "jailbreak_tuning_style": ("style_modulation", "suffix", "style_modulation"),
    "jailbreak_tuning_backdoor": ("backdoor", "prefix", "backdoor_trigger"),
}
ATTACKS.update({name: ATTACKS["mft_beavertails"] for name in JAILBREAK_TUNING})

TRAINING_EXPERIMENT_ROWS = {
    "sdd_paper": SDD_RECIPE,
    "quick_tiny": intended(steps=20, epochs=-1, lr=3e-3, batch=8, examples=64, length=128),
}

# tiny_matrix's own sizes and 6-step lengths, over each defense's and attack's other values.
TINY_DEFENSE = dict(steps=6, epochs=-1, lr=3e-3, batch=8, accumulate=1, examples=48, length=128)
TINY_ATTACK = dict(steps=6, epochs=-1, lr=3e-3, batch=8, examples=32, length=128)
# Jailbreak formats lengthen the prompt: tiny_matrix's per_attack gives those attacks room for the answer.
TINY_ATTACK_LENGTH = {"jailbreak_tuning_competing": {"length": 256}, "jailbreak_tuning_style": {"length": 256}}
TINY_EXAMPLES = {"t_vaccine": {"alignment": 48, "harmful": 200}}


def seam_attack(examples: int, optimizer: str, lr: float, lora: bool = False) -> dict[str, Any]:
    """SEAM's attack grid with the authors' recipe: one epoch, batch 4, cosine, 10% warmup, wd 0.01, no clipping."""
    return intended(
        steps=-1,
        epochs=1,
        lr=lr,
        batch=4,
        examples=examples,
        length=512,
        optimizer=optimizer,
        schedule=COSINE,
        warmup=0.1,
        weight_decay=0.01,
        clip=None,
        lora=LORA_R8 if lora else None,
    )


def worst_case_attack(choice: dict[str, str]) -> dict[str, Any]:
    """experiment=worst_case: the searched values reach the attack (mft_advbench, or its LoRA at the searched rank),
    its length in epochs."""
    adapter = choice["search.adapter"]
    lora = None if adapter == "full" else int(adapter.removeprefix("lora_r"))
    return {
        **ATTACKS["mft_advbench_lora" if lora else "mft_advbench"],
        "lr": float(choice["search.lr"]),
        "epochs": int(choice["search.epochs"]),
        "steps": -1,
        "examples": int(choice["search.num_examples"]),
        "optimizer": {"adamw": ADAMW, "sgd": SGD}[choice["search.optimizer"]],
        "schedule": {"constant": CONSTANT, "cosine": COSINE}[choice["search.scheduler"]],
        "lora": lora,
    }


# Per pipeline experiment: the scale of its defense stages, each defense's and each attack's (or attack
# setting's) intended values, and the capability tasks its evaluations run.
PIPELINE = {
    "tiny_matrix": {
        "scale": "cpu_demo",
        "defense": {
            d: {**row, **TINY_DEFENSE, **({"examples": TINY_EXAMPLES[d]} if d in TINY_EXAMPLES else {})}
            for d, row in DEFENSES.items()
        },
        "attack": {
            # every attack: it discovers them
            **{a: {**recipe, **TINY_ATTACK, **TINY_ATTACK_LENGTH.get(a, {})} for a, recipe in ATTACKS.items()},
            **OTHER_ATTACKS,
        },  # a weight edit's or an evaluation-time attack's own settings
        "capability": {"mmlu"},
    },
    "quickstart": {  # SDD as train.py trains it; a short MFT: 48 prompts, batch 8, 128 tokens, 2 epochs
        "scale": "cpu_demo",
        "defense": {"sdd": {**DEFENSES["sdd"], **CPU_DEMO}},
        "attack": {"mft_advbench": {**ATTACKS["mft_advbench"], "examples": 48, "batch": 8, "length": 128, "epochs": 2}},
        "capability": set(),
    },
    "paper_table1": {
        "scale": "paper",
        "defense": {"sdd": SDD_RECIPE},
        "attack": {"bft_sharegpt": ATTACKS["bft_sharegpt"], "mft_advbench": ATTACKS["mft_advbench"]},
        "capability": {"mmlu", "openbookqa"},
    },
    "sdd_efficiency": {
        "scale": "paper",
        "defense": {"sdd": {**SDD_RECIPE, "examples": 500}},
        "attack": {f"{k}x": {**ATTACKS["mft_beavertails"], "examples": 500 * k} for k in (1, 2, 5, 10, 20)},
        "capability": set(),
    },
    "sdd_reject": {
        "scale": "paper",
        "defense": {"sdd": SDD_RECIPE, "sdd_reject": SDD_RECIPE},
        "attack": {"mft_beavertails": ATTACKS["mft_beavertails"]},
        "capability": set(),
    },
    "worst_case": {  # the attack: a function of the trial's search values (each sweep point's)
        "scale": "cpu_demo",
        "defense": {"sdd": {**DEFENSES["sdd"], **CPU_DEMO}},
        "attack": worst_case_attack,
        "capability": {"mmlu"},
    },
    "seam_grid": {
        "scale": "paper",
        "defense": {d: DEFENSES[d] for d in ("sdd", "seam", "booster", "repnoise", "vaccine", "tar")},
        "attack": {
            "1": seam_attack(1000, ADAMW, 2e-5),
            "2": seam_attack(1000, ADAMW, 5e-5),
            "3": seam_attack(1000, ADAMW, 8e-5),
            "4": seam_attack(1000, ADAMW, 1e-4),
            "5": seam_attack(1000, ADAMW, 2e-4),
            "6": seam_attack(10000, ADAMW, 5e-5),
            "7": seam_attack(10000, ADAMW, 1e-4),
            "8": seam_attack(10000, ADAMW, 5e-5, lora=True),
            "9": seam_attack(10000, ADAMW, 1e-4, lora=True),
            "10": seam_attack(10000, SGD, 5e-5),
            "11": seam_attack(10000, SGD, 1e-4),
        },
        "capability": {"mmlu", "truthfulqa_mc1", "arc_easy", "hellaswag"},  # SEAM's four; ARC is ARC-Easy
    },
}


# ---------------------------------------------------------------------------------------------- what runs
def data_nodes(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """The data modules that are built: each stream of a multi-stream module, else the one module."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    if "streams" in data:
        return data["streams"]
    if "builder" in data:  # SDD: the pair builder makes data.num_examples pairs; both must agree
        assert data["builder"]["num_pairs"] == data["num_examples"], "data.builder.num_pairs != data.num_examples"
    return {"data": data}


def collapse(values: dict[str, Any]) -> Any:
    """One value when every stream has it, else ``{stream: value}``."""
    distinct = set(values.values())
    return distinct.pop() if len(distinct) == 1 else values


def running_values(cfg: DictConfig) -> dict[str, Any]:
    """The resolved leaves that decide a training run."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    trainer, optimizer, module = resolved["trainer"], resolved["optimizer"], resolved["module"]
    nodes = data_nodes(cfg)
    lora = module.get("lora")
    return dict(
        steps=trainer["max_steps"],
        epochs=trainer["max_epochs"],
        lr=optimizer["lr"],
        batch=collapse({n: d["batch_size"] for n, d in nodes.items()}),
        accumulate=trainer.get("accumulate_grad_batches", 1),
        examples=collapse({n: d["num_examples"] for n, d in nodes.items()}),
        length=collapse({n: d["max_length"] for n, d in nodes.items()}),
        optimizer=optimizer["_target_"],
        schedule=(resolved.get("scheduler") or {}).get("name"),
        warmup=module["warmup_ratio"],
        weight_decay=optimizer.get("weight_decay", 0.0),
        clip=trainer.get("gradient_clip_val"),
        lora=lora["r"] if lora else None,
    )


def mismatches(actual: dict[str, Any], expected: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Leaf -> (runs, intended) for every leaf that differs (floats compared to 1e-12 relative)."""

    def same(a, b):
        if isinstance(a, float) or isinstance(b, float):
            return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-12)
        return a == b

    return {k: (actual.get(k), v) for k, v in expected.items() if not same(actual.get(k), v)}


def assert_runs(cfg: DictConfig, expected: dict[str, Any], what: str) -> None:
    wrong = mismatches(running_values(cfg), expected)
    assert not wrong, f"{what}: leaf -> (what runs, intended): {wrong}"


def row(table: dict[str, Any], name: str, what: str) -> dict[str, Any]:
    assert name in table, f"{what} has no row in tests/test_resolved_config.py: add its intended values"
    return table[name]


# ---------------------------------------------------------------------------------------------- train.py
@pytest.mark.parametrize("defense", options("defense"))
def test_every_defense_at_paper_scale_runs_its_papers_recipe(defense, tmp_path):
    cfg = compose_config("train", [f"defense={defense}", "scale=paper"], output_dir=tmp_path)
    assert cfg.defense_name == defense and cfg.scale_name == "paper"
    assert_runs(cfg, row(DEFENSES, defense, f"defense={defense}"), f"train.py defense={defense} scale=paper")


@pytest.mark.parametrize("defense", options("defense"))
def test_every_defense_at_the_default_scale_runs_the_embedded_cpu_sizes(defense, tmp_path):
    cfg = compose_config("train", [f"defense={defense}"], output_dir=tmp_path)
    expected = {**row(DEFENSES, defense, f"defense={defense}"), **CPU_DEMO}
    expected["examples"] = CPU_DEMO_EXAMPLES.get(defense, CPU_DEMO["examples"])
    assert_runs(cfg, expected, f"train.py defense={defense}")


def test_the_embedded_default_is_sdd_at_the_cpu_demo_scale(tmp_path):
    cfg = compose_config("train", [], output_dir=tmp_path)
    assert (cfg.defense_name, cfg.scale_name, cfg.backbone.name, cfg.task_name) == (
        "sdd",
        "cpu_demo",
        "smollm2_135m_instruct",
        "train",
    )
    assert_runs(cfg, {**SDD_RECIPE, **CPU_DEMO}, "python train.py")


@pytest.mark.parametrize("experiment", TRAINING_EXPERIMENTS)
def test_every_training_experiment(experiment, tmp_path):
    cfg = compose_config("train", [f"experiment={experiment}"], output_dir=tmp_path)
    assert_runs(cfg, row(TRAINING_EXPERIMENT_ROWS, experiment, f"experiment={experiment}"), f"experiment={experiment}")


def test_an_experiment_keeps_a_defense_chosen_on_the_command_line(tmp_path):
    cfg = compose_config("train", ["experiment=sdd_paper", "defense=sdd_reject"], output_dir=tmp_path)
    assert cfg.defense_name == "sdd_reject" and cfg.data.answer_prefix.startswith("I refuse")
    assert_runs(cfg, SDD_RECIPE, "experiment=sdd_paper defense=sdd_reject")


# ---------------------------------------------------------------------------------------------- attack.py
@pytest.mark.parametrize("attack", [a for a in options("attack") if a not in OTHER_ATTACKS])
def test_every_attack_runs_its_own_recipe(attack, tmp_path):
    cfg = compose_config("attack", [f"attack={attack}", "model=some/folder"], output_dir=tmp_path)
    assert cfg.attack_name == attack and cfg.backbone.name_or_path == "some/folder"
    assert_runs(cfg, row(ATTACKS, attack, f"attack={attack}"), f"attack.py attack={attack}")


@pytest.mark.parametrize("attack", sorted(OTHER_ATTACKS))
def test_every_other_attack_runs_its_own_settings(attack, tmp_path):
    cfg = compose_config("attack", [f"attack={attack}", "model=some/folder"], output_dir=tmp_path)
    runs = {key: OmegaConf.select(cfg, key) for key in OTHER_ATTACKS[attack]}
    assert cfg.attack_name == attack and runs == OTHER_ATTACKS[attack]


@pytest.mark.parametrize("attack", options("attack"))
def test_only_jailbreak_tuning_formats_its_data_and_evaluates_with_the_format(attack, tmp_path):
    cfg = OmegaConf.to_container(
        compose_config("attack", [f"attack={attack}", "model=x"], output_dir=tmp_path), resolve=True
    )
    jailbreak, eval_attacks = cfg["data"].get("jailbreak"), cfg.get("eval_attacks") or {}
    if attack not in JAILBREAK_TUNING:
        assert jailbreak is None and not any(s.get("kind") == "prompt_format" for s in eval_attacks.values())
        return
    style, placement, label = JAILBREAK_TUNING[attack]
    assert cfg.get("attack_kind", "fine_tuning") == "fine_tuning"
    assert (jailbreak["style"], jailbreak["placement"]) == (style, placement)
    assert cfg["data"]["source"] == cfg["corpus"]["harmful_qa"]  # BeaverTails-style harmful QA with answers
    assert eval_attacks == {label: {"kind": "prompt_format", "format": jailbreak}}


@pytest.mark.parametrize("shots", [10, 50, 100])
def test_a_k_shot_sweep_keeps_the_attacks_epochs(shots, tmp_path):
    cfg = compose_config(
        "attack", ["attack=mft_advbench", "model=x", f"data.num_examples={shots}"], output_dir=tmp_path
    )
    assert_runs(cfg, {**ATTACKS["mft_advbench"], "examples": shots}, f"mft_advbench {shots}-shot")


# ---------------------------------------------------------------------------------------------- pipeline.py
def sweep_points(experiment: str) -> list[dict[str, str]]:
    """Every value of every sweep parameter, the others at their first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = sweep_params(experiment)  # ${sdd.options:<group>} expanded, as Hydra's sweeper sees it
    sweep = {}
    for key, text in params.items():
        override = OverridesParser.create().parse_override(f"{key}={text}")
        if override.is_interval_sweep():  # an Optuna search interval: its two ends
            sweep[key] = [str(override.value().start), str(override.value().end)]
        else:  # a,b,c / choice(...) / range(start,stop)
            sweep[key] = list(override.sweep_string_iterator())
    first = {key: values[0] for key, values in sweep.items()}
    points = {tuple(sorted({**first, key: value}.items())) for key, values in sweep.items() for value in values}
    return [dict(p) for p in sorted(points)]


def selected(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def capability_tasks(cfg: DictConfig) -> set[str]:
    capability = OmegaConf.to_container(cfg.eval.capability, resolve=True)
    return {name for name, source in capability["tasks"].items() if source} if capability["enabled"] else set()


@pytest.mark.parametrize("experiment", PIPELINE_EXPERIMENTS)
def test_every_stage_of_every_pipeline_experiment(experiment, tmp_path, monkeypatch):
    from sdd.pipeline import NONE, StagePlanner, attack_choice, hydra_context

    table = row(PIPELINE, experiment, f"experiment={experiment}")
    # Vanilla points resolve their backbone (a download for Hub backbones): only names are needed here.
    monkeypatch.setattr("sdd.pipeline.resolve_backbone", lambda backbone: f"/models/{backbone.name}")
    wrong = {}
    for choice in sweep_points(experiment):
        point = compose_config(
            "pipeline",
            [f"experiment={experiment}", *[f"{k}={v}" for k, v in choice.items()]],
            log_dir=tmp_path,
            cache_dir=tmp_path / "cache",
            output_dir=tmp_path / "run",
        )
        with hydra_context():
            stages = StagePlanner(point, Path(tmp_path / "stages")).plan()
        name = "/".join(choice.values())
        if "defense" in stages:
            defense = str(point.point.defense)
            stage = stages["defense"].cfg
            found = mismatches(
                {**running_values(stage), "scale": stage.get("scale_name")},
                {**row(table["defense"], defense, f"{experiment} defense {defense}"), "scale": table["scale"]},
            )
            if found:
                wrong[f"{name} defense"] = found
        setting = point.point.get("attack_setting")
        attack = str(setting) if setting is not None else attack_choice(point)[0]
        if attack in OTHER_ATTACKS:  # no fine-tuning: its own settings, in the stage that runs them
            intended_attack = row(table["attack"], attack, f"{experiment} attack {attack}")
            stage = stages["attack"] if "attack" in stages else stages["evaluate_after_attack"]
            keys = [k for k in intended_attack if "attack" in stages or k.startswith("eval_attacks.")]
            found = mismatches({k: selected(stage.cfg, k) for k in keys}, {k: intended_attack[k] for k in keys})
            if found:
                wrong[f"{name} attack"] = found
        elif "attack" in stages:
            assert attack != NONE
            intended_attack = (
                table["attack"](choice)
                if callable(table["attack"])
                else row(table["attack"], attack, f"{experiment} attack {attack}")
            )
            found = mismatches(running_values(stages["attack"].cfg), intended_attack)
            if found:
                wrong[f"{name} attack"] = found
        for stage_name in ("evaluate_before_attack", "evaluate_after_attack"):
            if stage_name in stages:
                tasks = capability_tasks(stages[stage_name].cfg)
                if tasks != table["capability"]:
                    wrong[f"{name} {stage_name}"] = {"capability": (sorted(tasks), sorted(table["capability"]))}
    assert not wrong, f"{experiment}: stage -> leaf -> (what runs, intended): {wrong}"


# ---------------------------------------------------------------------------------------------- the tables are whole
def test_every_config_has_a_row():
    assert set(options("defense")) == set(DEFENSES), "conf/defense and DEFENSES differ"
    assert set(options("attack")) == set(ATTACKS) | set(OTHER_ATTACKS), "conf/attack and ATTACKS differ"
    assert set(TRAINING_EXPERIMENTS) == set(TRAINING_EXPERIMENT_ROWS)
    assert set(PIPELINE_EXPERIMENTS) == set(PIPELINE)
    assert set(options("scale")) == {"paper", "cpu_demo"}


def test_the_run_names_its_scale_and_sizes_and_refuses_an_unbounded_length(tmp_path):
    from sdd.training import describe_training_size

    line = describe_training_size(compose_config("train", [], output_dir=tmp_path))
    assert line == (
        "Training defense sdd at scale cpu_demo: 160 examples, batch 4, 192 tokens, 40 steps, lr 2e-05, "
        "constant_with_warmup schedule (warmup 0.0)"
    )
    line = describe_training_size(compose_config("train", ["defense=simpo", "scale=paper"], output_dir=tmp_path))
    assert "scale paper: 8000 examples, batch 8 x 16 accumulated, 512 tokens, 1 epoch, lr 1e-06, cosine" in line
    line = describe_training_size(compose_config("attack", ["model=x"], output_dir=tmp_path))
    assert line.startswith("Training attack mft_advbench: 100 examples, batch 10, 256 tokens, 5 epochs, lr 5e-05")
    unbounded = compose_config("attack", ["model=x", "trainer.max_epochs=-1"], output_dir=tmp_path)
    with pytest.raises(ValueError, match="No training length: set trainer.max_steps"):
        describe_training_size(unbounded)


# ---------------------------------------------------------------------------------------------- epochs in Lightning
def logged(output_dir: Path, key: str) -> list[float]:
    import csv

    values = []
    for path in sorted(output_dir.glob("csv/version_*/metrics.csv")):
        with open(path) as handle:
            values += [float(r[key]) for r in csv.DictReader(handle) if r.get(key)]
    return values


def cosine_with_warmup(lr: float, total: int, warmup: int) -> list[float]:
    """The learning rate of each of ``total`` steps under transformers' cosine schedule."""
    return [
        lr * step / max(1, warmup)
        if step < warmup
        else lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        for step in range(total)
    ]


def test_an_epoch_length_trains_those_epochs_and_the_schedule_spans_them(tmp_path, cache_dir, tiny_backbone):
    """Attack in epochs: 5 epochs of 20 examples at batch 10 are 10 steps, and cosine warmup spans all 10."""
    from sdd.training import train

    cfg = compose_config(
        "attack",
        [
            f"model={tiny_backbone.resolve()}",
            "attack=mft_advbench",
            "data.num_examples=20",
            "data.max_length=64",
            "scheduler=cosine",
            "module.warmup_ratio=0.1",
            "optimizer.lr=1e-3",
            "sample_prompts=null",
        ],
        output_dir=tmp_path / "attack",
        cache_dir=cache_dir,
    )
    summary = train(cfg)
    assert summary["global_step"] == 10
    assert logged(tmp_path / "attack", "train/lr") == pytest.approx(cosine_with_warmup(1e-3, total=10, warmup=1))


def test_a_multi_stream_epoch_is_the_longest_stream(tmp_path, cache_dir, tiny_backbone):
    """SEAM at paper scale (one epoch, manual optimization): streams of 2 and 3 batches make 3 steps."""
    from sdd.training import train

    cfg = compose_config(
        "train",
        [
            "backbone=tiny_llama",
            "defense=seam",
            "scale=paper",
            "data.num_examples=8",
            "data.streams.benign.num_examples=12",
            "data.max_length=64",
            "sample_prompts=null",
        ],
        output_dir=tmp_path / "seam",
        cache_dir=cache_dir,
    )
    assert (cfg.trainer.max_epochs, cfg.trainer.max_steps, cfg.data.batch_size) == (1, -1, 4)
    summary = train(cfg)
    assert summary["global_step"] == 3
    # SEAM steps its scheduler itself and logs the rate after the step: the schedule's steps 1, 2 and its end.
    expected = cosine_with_warmup(2e-5, total=3, warmup=0)[1:] + [0.0]
    assert logged(tmp_path / "seam", "train/lr") == pytest.approx(expected, abs=1e-12)
