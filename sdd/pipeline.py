"""One point of a backbone x defense x attack sweep: defense -> attack -> evaluate, stages reused.

Each stage is the ordinary entry point's config (``train``, ``attack``, ``eval``) composed with the
point's choices and the experiment's stage overrides. A stage's folder is named by a hash of its
resolved config (machine paths left out), under ``stages_dir``: when a later job asks for the same
stage (the same defended model under eleven attacks, or a sweep started again after a crash) the
finished folder is reused, and an unfinished one resumes from its last checkpoint. A file lock per
stage lets parallel jobs (SLURM arrays) wait for a stage another job is computing instead of
computing it twice.

``point.attack`` is a chain of ``conf/attack`` entries joined by ``+`` (``mft_advbench+prefilling``):
its weight attacks (``attack_kind`` fine_tuning or weight_edit) run as successive stages ``attack``,
``attack_2``, ..., each on the previous one's model; its evaluation-time attacks (``attack_kind``
evaluation) come last. The ``eval_attacks`` of every element (their union, in chain order) go into the
after-attack evaluation's config, hence into its hash: the same attacked model evaluated with other
evaluation-time attacks is another stage.

``run_pipeline(cfg)`` is what ``pipeline.py`` calls; it writes the point's ``results.json``
(evaluations before and after the attack, and where each stage lives) into ``paths.output_dir``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from sdd.credentials import scrub_credentials
from sdd.errors import ConfigError
from sdd.evaluation.generation import drop_unhashed_generation_settings

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
STAGE_RECORD = "stage.json"
NONE = "none"
CHAIN_SEPARATOR = "+"  # point.attack=a+b: Hydra's override parser reads "+" inside a value as text
WEIGHT_ATTACKS = ("fine_tuning", "weight_edit")  # attack_kind of the chain elements that run as stages
# Keys that say where or how verbosely a stage runs, not what it computes: left out of its hash.
NOT_HASHED = (
    "paths",
    "logger",
    "checkpoint",
    "ckpt_path",
    "prepare_only",
    "task_name",
    "sample_prompts",
    "sample_max_new_tokens",
    "resume",
    "overwrite",
)
# Backbone settings the folder of a trained model does not carry: passed on to later stages.
BACKBONE_SETTINGS = ("dtype", "trust_remote_code", "chat_template", "attn_implementation")


@dataclass
class Stage:
    """One composed stage: its config, the hash of that config and its folder."""

    kind: str  # defense | attack | evaluate
    cfg: DictConfig
    key: str
    dir: Path


def run_pipeline(cfg: DictConfig) -> dict[str, Any]:
    """Run (or reuse) the defense, attack and evaluation stages of the point ``cfg`` describes."""
    started = time.time()
    point = describe_point(cfg)
    with hydra_context():
        planner = StagePlanner(cfg, Path(cfg.stages.dir).expanduser().resolve())
        stages = planner.plan()
    if cfg.get("dry_run"):
        for name, stage in stages.items():
            state = "finished" if (stage.dir / STAGE_RECORD).exists() else "to run"
            overrides = " ".join(scrub_credentials(list(stage.cfg.stage_overrides)))
            print(f"{name:24s} {state:9s} {stage.dir}\n{'':24s} overrides: {overrides}")
            if stage.kind == "evaluate" and stage.cfg.get("eval_attacks"):
                print(f"{'':24s} eval_attacks: {', '.join(stage.cfg.eval_attacks)}")
        return {"point": point, "planned": {name: str(stage.dir) for name, stage in stages.items()}}

    from sdd.data.overlap import point_overlap

    # Training data vs evaluation prompts, counted before anything trains (0 expected; a warning otherwise).
    record: dict[str, Any] = {"point": point, "stages": {}, "evaluations": {}, "data_overlap": point_overlap(stages)}
    if planner.vanilla_model is not None:
        record["stages"]["defense"] = {"model_dir": planner.vanilla_model, "vanilla": True}
    for number, (name, stage) in enumerate(stages.items(), start=1):  # in order: each uses an earlier one's output
        log.info("Point %s: stage %d/%d, %s", point["name"], number, len(stages), name)
        runner = {"evaluate": _evaluate_stage, "attack": _attack_stage}.get(stage.kind, _train_stage)
        record["stages"][name] = planner.run(stage, runner)
        if stage.kind == "evaluate":
            record["evaluations"][name.removeprefix("evaluate_")] = record["stages"][name].pop("result")

    record["reused_stages"] = sorted(name for name, s in record["stages"].items() if s.get("reused"))
    record["seconds"] = round(time.time() - started, 1)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results_path = output_dir / "results.json"
    temporary = results_path.with_name(f"results.json.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(scrub_credentials(record), indent=2))
    temporary.replace(results_path)
    log.info(
        "Point %s done in %.0f s (reused: %s); results in %s",
        point["name"],
        record["seconds"],
        record["reused_stages"] or "none",
        output_dir / "results.json",
    )
    return record


def describe_point(cfg: DictConfig) -> dict[str, Any]:
    """The point's identity: backbone, defense, ``attack`` (the full chain, ``a+b``), attack setting, seed."""
    attack, _ = attack_choice(cfg)
    setting = cfg.point.get("attack_setting")
    name = f"{cfg.point.backbone}/{cfg.point.defense}/{attack if setting is None else f'{attack}#{setting}'}"
    return {
        "name": name,
        "backbone": str(cfg.point.backbone),
        "defense": str(cfg.point.defense),
        "attack": attack,
        "attack_setting": None if setting is None else str(setting),
        "seed": cfg.seed,
    }


def attack_choice(cfg: DictConfig) -> tuple[str, list[str]]:
    """The attack chain (``a+b``, or ``none``) and its extra overrides: ``point.attack``, or the named
    ``attack_settings`` entry (whose ``attack`` may be a chain too; its overrides apply to every element)."""
    setting = cfg.point.get("attack_setting")
    if setting is None:
        return chain_text(cfg.point.attack, "point.attack"), []
    settings = {str(name): value for name, value in (cfg.get("attack_settings") or {}).items()}
    if str(setting) not in settings:
        raise KeyError(f"point.attack_setting={setting} is not in attack_settings (known: {sorted(settings)}).")
    chosen = settings[str(setting)]
    return chain_text(chosen.attack, f"attack_settings.{setting}.attack"), list(chosen.get("overrides") or [])


def attack_chain(attack: Any, key: str = "point.attack") -> list[str]:
    """The ``conf/attack`` entries of the chain ``a+b+...`` in order; ``[]`` for ``none``.

    Raises:
        ConfigError: an empty element, or ``none`` inside a chain.
    """
    text = str(attack).strip()
    if text == NONE:
        return []
    elements = [element.strip() for element in text.split(CHAIN_SEPARATOR)]
    if not all(elements) or NONE in elements:
        raise ConfigError(
            f"{key}={text!r} is not an attack chain: write conf/attack entries joined by "
            f"'{CHAIN_SEPARATOR}' (e.g. mft_advbench{CHAIN_SEPARATOR}prefilling), or {NONE} alone."
        )
    return elements


def chain_text(attack: Any, key: str = "point.attack") -> str:
    """The chain as one string (``a+b``, ``none``): the point's ``attack`` and the report's row label."""
    return CHAIN_SEPARATOR.join(attack_chain(attack, key)) or NONE


def known_attacks() -> list[str]:
    """The ``conf/attack`` options of the Hydra app in use (files and ConfigStore entries)."""
    from hydra.core.global_hydra import GlobalHydra

    return sorted(GlobalHydra.instance().config_loader().get_group_options("attack"))


def resolve_backbone(backbone_cfg: DictConfig) -> str:
    """The folder (or Hub id) of an untrained backbone, as the attack and evaluation stages load it."""
    from hydra.utils import instantiate

    return instantiate(backbone_cfg).resolve()


class StagePlanner:
    """Composes stage configs for one point, names their folders, and runs or reuses them."""

    def __init__(self, cfg: DictConfig, stages_dir: Path) -> None:
        self.cfg = cfg
        self.stages_dir = stages_dir
        # Absolute, so that stages find the same files from any working directory.
        paths = {k: str(Path(v).expanduser().resolve()) for k, v in cfg.paths.items() if k != "output_dir"}
        self.path_overrides = [f"paths.{k}={override_value(v)}" for k, v in paths.items()]
        # Longest first, so that a path inside another is replaced by its own placeholder.
        self.placeholders = sorted(
            [(v, f"<paths.{k}>") for k, v in paths.items()] + [(str(stages_dir), "<stages>")],
            key=lambda item: -len(item[0]),
        )
        self.common = [f"seed={cfg.seed}", f"corpus={cfg.stages.corpus}", *cfg.stages.overrides.common]
        self.training_choices = [f"trainer={cfg.stages.trainer}", f"logger={cfg.stages.logger}"]
        if cfg.stages.logger == "wandb":  # one wandb run per training stage, grouped by point
            self.training_choices.append(f"logger.group={override_value(describe_point(cfg)['name'])}")
        self.vanilla_model: str | None = None

    def plan(self) -> dict[str, Stage]:
        """The point's stages, in order. A trained model lives in ``<stage dir>/model``, so every stage
        can be composed (and named) before any runs."""
        cfg, point = self.cfg, describe_point(self.cfg)
        attack, attack_overrides = attack_choice(cfg)
        chain = attack_chain(attack)
        unknown = [name for name in chain if name not in known_attacks()]
        if unknown:
            raise ConfigError(
                f"point.attack={attack}: {', '.join(unknown)} is not a conf/attack option; the options "
                f"are {', '.join(known_attacks())} (chain them with '{CHAIN_SEPARATOR}')."
            )
        stages: dict[str, Stage] = {}
        # 1. Defense: train the backbone with the defense, or take it as it is (Vanilla).
        if point["defense"] == NONE:
            backbone_cfg = self.compose("train", "defense", [f"backbone={point['backbone']}"]).cfg.backbone
            self.vanilla_model = model = resolve_backbone(backbone_cfg)
        else:
            stages["defense"] = self.compose(
                "train",
                "defense",
                [
                    f"backbone={point['backbone']}",
                    f"defense={point['defense']}",
                    f"scale={cfg.stages.scale}",
                    *self.training_choices,
                    *cfg.stages.overrides.defense,
                    *(cfg.stages.overrides.get("per_defense") or {}).get(point["defense"], []),
                ],
                label=f"{point['backbone']}-{point['defense']}",
            )
            backbone_cfg = stages["defense"].cfg.backbone
            model = str(stages["defense"].dir / "model")
        # A model folder loads as backbone=custom; it keeps the backbone's loading settings.
        as_model = [f"backbone.{k}={override_value(backbone_cfg[k])}" for k in BACKBONE_SETTINGS]
        evaluate = [*as_model, *cfg.stages.overrides.evaluate]
        # 2. The defended model's evaluation, shared by every attack on it.
        if cfg.stages.evaluate_before_attack or attack == NONE:
            stages["evaluate_before_attack"] = self.compose(
                "eval", "evaluate", [f"model={override_value(model)}", *evaluate], label="before_attack"
            )
        # 3. The chain's weight attacks, each on the previous model, then 4. the attacked model's evaluation
        # with every element's evaluation-time attacks.
        if chain:
            eval_attacks = OmegaConf.create({})
            weight_stages, evaluation_element = 0, None
            for name in chain:
                element = self.compose(
                    "attack",
                    "attack",
                    [
                        f"model={override_value(model)}",
                        *as_model,
                        f"attack={name}",
                        *self.training_choices,
                        *cfg.stages.overrides.attack,
                        *(cfg.stages.overrides.get("per_attack") or {}).get(name, []),
                        *attack_overrides,
                    ],
                    label=name,
                )
                # Union in chain order (a later element's keys win): an override every element receives, e.g.
                # ++eval_attacks.prefilling.prefill_tokens=[5], completes the entry that defines the variant.
                found = element.cfg.get("eval_attacks")
                eval_attacks = OmegaConf.merge(
                    eval_attacks, OmegaConf.to_container(found, resolve=True) if found else {}
                )
                kind = str(element.cfg.get("attack_kind") or "fine_tuning")
                if kind == "evaluation":  # no stage: it adds variants to the evaluation
                    evaluation_element = name
                    continue
                if kind not in WEIGHT_ATTACKS:
                    raise ConfigError(
                        f"conf/attack/{name}.yaml: attack_kind={kind} is not one of {[*WEIGHT_ATTACKS, 'evaluation']}."
                    )
                if evaluation_element is not None:
                    raise ConfigError(
                        f"point.attack={attack}: {evaluation_element} is an evaluation-time attack (attack_kind: "
                        f"evaluation) and must come last, after the weight attack {name}: write "
                        f"{CHAIN_SEPARATOR.join([n for n in chain if n != evaluation_element] + [evaluation_element])}."
                    )
                weight_stages += 1
                stages["attack" if weight_stages == 1 else f"attack_{weight_stages}"] = element
                model = str(element.dir / "model")
            stages["evaluate_after_attack"] = self.compose(
                "eval",
                "evaluate",
                [f"model={override_value(model)}", *evaluate],
                label="after_attack",
                patch={"eval_attacks": OmegaConf.to_container(eval_attacks, resolve=True)} if eval_attacks else None,
            )
        return stages

    def compose(
        self,
        config_name: str,
        kind: str,
        overrides: Sequence[str],
        label: str | None = None,
        patch: dict[str, Any] | None = None,
    ) -> Stage:
        """The stage ``config_name`` composed with ``overrides``, then ``patch``'s top-level keys set (before
        the hash: values an override string cannot carry, like the chain's ``eval_attacks``)."""
        from hydra import compose

        all_overrides = [*self.path_overrides, *self.common, *overrides]
        cfg = compose(config_name=config_name, overrides=all_overrides)
        if patch:
            with open_dict(cfg):
                for name, value in patch.items():
                    cfg[name] = value
        # An attack stage's eval_attacks say how its model is evaluated, not what it trains: the same model
        # evaluated with and without a variant is trained once.
        key = self.config_key(cfg, unhashed=("eval_attacks",) if kind == "attack" else ())
        stage_dir = self.stages_dir / kind / f"{safe_name(label or kind)}-{key}"
        with open_dict(cfg):
            cfg.paths.output_dir = str(stage_dir)
            cfg.task_name = f"{kind}-{safe_name(label or kind)}"
            cfg.stage_overrides = list(all_overrides)
        return Stage(kind, cfg, key, stage_dir)

    def config_key(self, cfg: DictConfig, unhashed: Sequence[str] = ()) -> str:
        """A hash of what the stage computes: its resolved config without paths, logging or checkpoints."""
        hashed = copy.deepcopy(cfg)
        with open_dict(hashed):
            for key in list(hashed.paths):
                hashed.paths[key] = f"<paths.{key}>"
            text = json.dumps(OmegaConf.to_container(hashed, resolve=True), sort_keys=True, default=str)
        container = json.loads(text)
        for key in (*NOT_HASHED, *unhashed):
            container.pop(key, None)
        drop_unhashed_generation_settings(container)  # eval.generation: only what changes the answers
        # What the stage's data files hold, not only their names: an edited file is a new stage. The corpus
        # node is the menu every stage config carries; what a stage reads is interpolated into its data / eval.
        container["data_fingerprints"] = data_fingerprints({k: v for k, v in container.items() if k != "corpus"})
        text = json.dumps(container, sort_keys=True)
        for path, placeholder in self.placeholders:  # model folders of earlier stages, converted backbones
            text = text.replace(path, placeholder)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def run(self, stage: Stage, function: Callable[[DictConfig], dict[str, Any]]) -> dict[str, Any]:
        """Run ``function`` on the stage unless its folder holds a finished record; return the record."""
        from filelock import FileLock

        stage.dir.mkdir(parents=True, exist_ok=True)
        record_path = stage.dir / STAGE_RECORD
        with FileLock(str(stage.dir) + ".lock"):  # a parallel job computing this stage: wait for it
            if record_path.exists():
                record = json.loads(record_path.read_text())
                log.info("Reusing %s stage %s", stage.kind, stage.dir)
                return {**record, "reused": True}
            log.info("Running %s stage in %s", stage.kind, stage.dir)
            started = time.time()
            result = function(stage.cfg)
            record = {
                "kind": stage.kind,
                "key": stage.key,
                "dir": str(stage.dir),
                "overrides": list(stage.cfg.stage_overrides),
                "seconds": round(time.time() - started, 1),
                **result,
            }
            record = scrub_credentials(record)
            temporary = record_path.with_suffix(".tmp")
            temporary.write_text(json.dumps(record, indent=2))
            temporary.replace(record_path)  # atomic: a record exists only for a finished stage
        return {**record, "reused": False}


def data_fingerprints(container: Any, prefix: str = "") -> dict[str, str]:
    """``{config key: content fingerprint}`` of every local data source in a resolved stage config.

    A data source is a mapping with ``columns`` and a ``path`` or ``hub_id`` (see
    :mod:`sdd.data.sources`); capability benchmark files (``eval.capability.tasks``) are plain paths.
    Hub sources are named by their spec, which the config already holds.
    """
    from sdd.data.sources import DataSource

    found: dict[str, str] = {}
    if isinstance(container, dict):
        if "columns" in container and (container.get("path") or container.get("hub_id")):
            fields = {k: v for k, v in container.items() if k in DataSource.__dataclass_fields__}
            source = DataSource.from_config(fields, prefix or "data")
            if source.local_path() is not None:
                found[prefix] = _file_fingerprint(source)
            return found
        for key, value in container.items():
            found.update(data_fingerprints(value, f"{prefix}.{key}" if prefix else str(key)))
        if prefix.endswith("capability.tasks"):
            for key, value in container.items():
                if isinstance(value, str) and value not in ("hub",):
                    found[f"{prefix}.{key}"] = _file_fingerprint(DataSource(name=key, path=value))
    elif isinstance(container, list):
        for index, value in enumerate(container):
            found.update(data_fingerprints(value, f"{prefix}.{index}"))
    return found


_FINGERPRINTS: dict[tuple[Any, ...], str] = {}


def _file_fingerprint(source: Any) -> str:
    """``source.fingerprint()``, computed once per source and file version (size, mtime) in this process."""
    local = source.local_path()
    try:
        stat = local.stat()
        version = (repr(source), str(local.resolve()), stat.st_size, stat.st_mtime_ns)
    except OSError:  # a missing file: the stage fails when it reads it, naming the fix
        return source.fingerprint()
    if version not in _FINGERPRINTS:
        _FINGERPRINTS[version] = source.fingerprint()
    return _FINGERPRINTS[version]


def _attack_stage(cfg: DictConfig) -> dict[str, Any]:
    # Fine-tuning or a weight edit, as the attack's attack_kind says.
    from sdd.attacks import run_attack

    return _train_stage(cfg, run_attack)


def _train_stage(cfg: DictConfig, fit: Callable[[DictConfig], dict[str, Any]] | None = None) -> dict[str, Any]:
    from sdd.training import train

    # A stage without a record is unfinished by definition (its folder is named by its config): train it
    # even if a model/ was saved before the record was written; a checkpoint still resumes it.
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.overwrite = True
    summary = (fit or train)(cfg)
    return {
        "model_dir": summary["model_dir"],
        "global_step": summary["global_step"],
        "metrics": summary.get("metrics", {}),
    }


def _evaluate_stage(cfg: DictConfig) -> dict[str, Any]:
    from sdd.evaluation.run import evaluate

    results = evaluate(cfg)
    return {"result": {k: v for k, v in results.items() if k != "config"}}


@contextlib.contextmanager
def hydra_context() -> Iterator[None]:
    """Hydra's compose API: the running app's (inside ``pipeline.py``), else one on ``conf/``."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield


def override_value(value: Any) -> str:
    """``value`` written so that Hydra's override parser reads it back unchanged."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    text = str(value)
    if re.fullmatch(r"[\w./:+-]+", text) and not re.fullmatch(r"(?i)null|true|false|[\d.e+-]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def safe_name(text: str) -> str:
    return re.sub(r"[^\w.+-]+", "_", str(text)).strip("_") or "stage"


def print_point(record: dict[str, Any]) -> None:
    """The point's headline numbers, for a person watching a run."""
    if "planned" in record:  # a dry run printed its plan already
        return
    print(
        f"\n{record['point']['name']}  ({record['seconds']} s, reused: {', '.join(record['reused_stages']) or 'none'})"
    )
    for name, evaluation in record["evaluations"].items():
        harm = (evaluation.get("harmfulness") or {}).get("overall", {})
        capability = {k: v["acc"] for k, v in (evaluation.get("capability") or {}).items() if isinstance(v, dict)}
        shown = {k: round(v, 3) for k, v in harm.items() if isinstance(v, float)}
        benign = {
            k: round(v, 3)
            for k, v in ((evaluation.get("benign") or {}).get("overall") or {}).items()
            if k in ("on_topic_rate", "refusal_rate", "reference_nll") and isinstance(v, float)
        }
        print(f"  {name}: harmfulness {shown} benign {benign} capability {capability}")
        for variant, under in (evaluation.get("harmfulness_under_attack") or {}).items():
            shown = {k: round(v, 3) for k, v in (under.get("overall") or {}).items() if isinstance(v, float)}
            print(f"  {name} [{variant}]: harmfulness {shown}")
