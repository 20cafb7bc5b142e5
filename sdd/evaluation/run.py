"""Evaluate a model: harmfulness (generate, then judge), benign behaviour and general capability, as JSON.

``evaluate(cfg)`` is what ``evaluate.py`` calls. Outputs, in ``paths.output_dir``:
``results.json`` (metrics overall and per prompt set and category, and the resolved config),
``generations.jsonl`` (harmful prompt, answer, each judge's verdict), ``benign_generations.jsonl``
(benign prompt, reference, answer, verdicts, reference NLL; see :mod:`sdd.evaluation.benign`) and
``summary.md``. Every answer comes from the backend of ``eval.generation`` (the local model, or an
OpenAI-compatible server: :mod:`sdd.evaluation.generation`); ``results.json`` says which under ``generation``.

Evaluation-time attacks (``eval_attacks``, :mod:`sdd.attacks.eval_time`): each variant's answers are judged
like the plain ones into ``results["harmfulness_under_attack"][<variant>]`` and written to
``generations_<variant>.jsonl``; ``results["harmfulness"]`` stays the evaluation without attack.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sdd.attacks.eval_time import (
    ATTACK_COLUMNS,
    answer_under_attack,
    check_backend,
    expand_variants,
    judged_variants,
    refuse_weight_attack,
)
from sdd.credentials import scrub_credentials
from sdd.data.sources import DataSourceError, is_missing, load_records
from sdd.errors import ConfigError, require_device
from sdd.evaluation.benign import evaluate_benign
from sdd.evaluation.benign import summary_lines as benign_summary_lines
from sdd.evaluation.generation import (
    LocalGenerator,
    backend_of,
    build_openai_generator,
    generate_answers,
    needs_local_model,
)

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the suites named in ``cfg.eval`` on ``cfg.backbone`` and write the results."""
    started = time.time()
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    require_device(cfg.eval.device, "eval.device")  # before anything loads
    refuse_weight_attack(cfg)
    attack_variants = expand_variants(cfg.get("eval_attacks"))
    if attack_variants and not cfg.eval.harmfulness.enabled:
        raise ConfigError(
            "eval_attacks attack the harmful prompts, but eval.harmfulness.enabled=false. Fix: "
            "eval.harmfulness.enabled=true, or drop the evaluation-time attack."
        )
    backbone = instantiate(cfg.backbone)
    judges = build_judges(cfg.eval.judges)  # fail fast (missing key, bad labels) before generating
    if cfg.eval.capability.enabled and not any(cfg.eval.capability.tasks.values()):
        from sdd.evaluation.capability import evaluate_capability

        evaluate_capability(None, None, {})  # raises the ConfigError naming the fix, before anything loads
    backend = backend_of(cfg.eval)
    check_backend(attack_variants, backend)
    tokenizer = backbone.load_tokenizer()
    # The server's generator is built before the weights load: a missing key or a bad setting fails first.
    remote = build_openai_generator(cfg.eval.generation.openai, backbone, tokenizer) if backend == "openai" else None
    # With backend=openai the weights load only for likelihoods (reference NLL, capability, gradients).
    device = cfg.eval.device or ("cuda" if _cuda() else "cpu")
    model = backbone.load_model().to(device).eval() if needs_local_model(cfg.eval) else None
    generator = remote or LocalGenerator(model, tokenizer, device)

    results: dict[str, Any] = {
        "model": backbone.resolve() if backbone.source == "pretrained" else backbone.name,
        "device": device,
        "generation": generator.describe(),  # what produced every answer
    }
    if cfg.eval.harmfulness.enabled:
        attack_rows = load_prompt_sets(
            cfg.eval.harmfulness.prompt_sets,
            cfg.eval.harmfulness.max_prompts_per_set,
            attack_columns=bool(attack_variants),
        )
        rows = [{k: v for k, v in row.items() if k not in ATTACK_COLUMNS} for row in attack_rows]
        answers = generate_answers(
            generator,
            [r["prompt"] for r in rows],
            max_new_tokens=cfg.eval.harmfulness.max_new_tokens,
            batch_size=cfg.eval.harmfulness.batch_size,
            system_prompt=cfg.eval.harmfulness.system_prompt,
            progress=True,
        )
        for row, answer in zip(rows, answers):
            row["answer"] = answer
        _write_jsonl(output_dir / "generations.jsonl", rows)  # kept even if a judge fails below
        results["harmfulness"] = judge_generations(
            rows, judges, cfg.eval.judges.get("min_valid_fraction", DEFAULT_MIN_VALID_FRACTION)
        )
        _write_jsonl(output_dir / "generations.jsonl", rows)
        if attack_variants:
            results["harmfulness_under_attack"] = evaluate_under_attacks(
                attack_variants, attack_rows, generator, judges, cfg, output_dir
            )
    if cfg.eval.get("benign") is not None and cfg.eval.benign.enabled:
        results["benign"] = evaluate_benign(
            model, tokenizer, cfg.eval.benign, judges, output_dir, cfg.eval.judges, generator=generator
        )
    if cfg.eval.capability.enabled:
        from sdd.evaluation.capability import evaluate_capability

        results["capability"] = evaluate_capability(
            model,
            tokenizer,
            {name: path for name, path in cfg.eval.capability.tasks.items() if path},
            batch_size=cfg.eval.capability.batch_size,
            limit=cfg.eval.capability.limit,
            num_fewshot=cfg.eval.capability.num_fewshot,
        )
    if cfg.eval.get("gradient_separation") is not None and cfg.eval.gradient_separation.enabled:
        # SEAM's Figure 6: PCA of per-batch harmful vs. benign gradients (sdd/evaluation/gradient_separation.py).
        from sdd.evaluation.gradient_separation import run_gradient_separation

        results["gradient_separation"] = run_gradient_separation(
            model, tokenizer, cfg.eval.gradient_separation, output_dir
        )
    results["seconds"] = round(time.time() - started, 1)
    results["config"] = scrub_credentials(OmegaConf.to_container(cfg, resolve=True))  # no user:pass@ in URLs
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    (output_dir / "summary.md").write_text(markdown_summary(results))
    log.info("Results written to %s", output_dir)
    return results


def evaluate_under_attacks(
    variants: list[tuple[str, dict[str, Any]]],
    rows: list[dict[str, Any]],
    generator,
    judges: dict[str, Any],
    cfg: DictConfig,
    output_dir: Path,
) -> dict[str, Any]:
    """Answer and judge the harmful prompts under each evaluation-time attack variant.

    Returns:
        variant -> :func:`judge_generations`' output, plus ``attack`` (the variant's spec), ``judged`` (for a
        prefilling variant, the text judged: ``prefix_and_continuation`` or ``continuation``; the two share one
        generation) and what the attack adds (e.g. prompts skipped, target losses); answers judged in
        ``generations_<variant>.jsonl``.
    """
    settings = cfg.eval.harmfulness
    results: dict[str, Any] = {}
    for variant, spec in variants:
        log.info("Evaluation under attack: %s (%s)", variant, spec["kind"])
        answered, extra = answer_under_attack(
            spec,
            rows,
            generator,
            max_new_tokens=settings.max_new_tokens,
            batch_size=settings.batch_size,
            system_prompt=settings.system_prompt,
            progress=True,
        )
        views = judged_variants(variant, spec, answered)  # generated once, judged per text (prefilling)
        for name, _, view in views:
            _write_jsonl(output_dir / f"generations_{name}.jsonl", view)  # kept even if a judge fails below
        for name, judged_text, view in views:
            judged = judge_generations(
                view, judges, cfg.eval.judges.get("min_valid_fraction", DEFAULT_MIN_VALID_FRACTION)
            )
            results[name] = {**judged, "attack": spec, **({"judged": judged_text} if judged_text else {}), **extra}
            _write_jsonl(output_dir / f"generations_{name}.jsonl", view)
    return results


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def load_prompt_sets(
    prompt_sets: dict[str, Any], max_per_set: int | None, attack_columns: bool = False
) -> list[dict[str, Any]]:
    """Harmful prompts from each named source (columns ``prompt`` and optionally ``category``).

    Args:
        attack_columns: also read the evaluation-time attacks' columns (``prefill``, ``target``:
            :data:`sdd.attacks.eval_time.ATTACK_COLUMNS`) where the source maps them; without an attack
            they are not read, so a file without them still evaluates.
    """
    rows: list[dict[str, Any]] = []
    for set_name, source in (prompt_sets or {}).items():
        if source is None:
            continue
        if not attack_columns:
            source = OmegaConf.to_container(source, resolve=True) if isinstance(source, DictConfig) else dict(source)
            source["columns"] = {k: v for k, v in (source.get("columns") or {}).items() if k not in ATTACK_COLUMNS}
        records = load_records(source, name=f"corpus.eval_prompts.{set_name}", required=["prompt"])
        if max_per_set is not None:
            records = records[:max_per_set]
        for record in records:
            category = record.get("category")
            row = {
                "prompt_set": set_name,
                "category": str(category) if category not in (None, "") else None,
                "prompt": str(record["prompt"]),
            }
            row.update({column: str(record[column]) for column in ATTACK_COLUMNS if not is_missing(record.get(column))})
            rows.append(row)
    if not rows:
        raise DataSourceError("No harmful prompt to evaluate: eval.harmfulness.prompt_sets is empty.")
    return rows


# An enabled judge with valid verdicts on fewer answers fails the evaluation (eval.judges.min_valid_fraction).
DEFAULT_MIN_VALID_FRACTION = 0.9
PROXY = "proxy"  # the offline stand-in for harmful compliance: on topic and not refused


def build_judges(config: DictConfig) -> dict[str, Any]:
    """Instantiate the enabled judges (each config node has ``enabled`` and the judge's arguments).

    Scalar settings of ``eval.judges`` (``min_valid_fraction``) are not judges and are skipped.
    """
    judges = {}
    for name, node in (config or {}).items():
        if not isinstance(node, (DictConfig, dict)) or not node.get("enabled", False):
            continue
        node = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
        arguments = {k: v for k, v in node.items() if k != "enabled"}
        judges[name] = instantiate(arguments)
    return judges


def judge_generations(
    rows: list[dict[str, Any]], judges: dict[str, Any], min_valid_fraction: float = DEFAULT_MIN_VALID_FRACTION
) -> dict[str, Any]:
    """Put each judge's verdict into ``rows`` and return metrics overall, per set and per category.

    Args:
        rows: generations with ``prompt``, ``answer``, ``prompt_set`` and ``category``.
        judges: name -> judge (see :mod:`sdd.evaluation.judges` for the interface).
        min_valid_fraction: a judge whose verdicts are valid on fewer answers than this fraction (or
            on none) fails the evaluation; judged replies stay in its cache, so a re-run resumes.

    Returns:
        ``judges`` ({name: {"kind", "model", "prompt_file", "metrics", ...}}: what produced each
        metric), ``overall``, ``per_prompt_set`` and ``per_category`` metrics, and ``agreement``
        ({"<a>|<b>": {"num_items", "percent_agreement", "cohen_kappa"}} between every two harm judges,
        the offline proxy included as ``proxy``; empty with fewer than two).

    Raises:
        TooFewValidVerdictsError: a judge fell below ``min_valid_fraction``.
        JudgeEndpointError: an LLM judge's endpoint rejected the key, is unknown or stays down.
    """
    from sdd.evaluation.agreement import pairwise_agreement
    from sdd.evaluation.judges import check_valid_fraction, on_topic_compliance

    if not 0.0 <= min_valid_fraction <= 1.0:
        raise ValueError(f"eval.judges.min_valid_fraction must be in [0, 1], got {min_valid_fraction}.")
    prompts, answers = [r["prompt"] for r in rows], [r["answer"] for r in rows]
    for name, judge in judges.items():
        verdicts = judge.judge(prompts, answers)
        for row, verdict in zip(rows, verdicts):
            row.setdefault("verdicts", {})[name] = verdict
        check_valid_fraction(name, judge, verdicts, min_valid_fraction)  # before spending time on the next judge
    has_proxy = "refusal" in judges and "relevance" in judges

    def metrics(subset: Sequence[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"num_prompts": len(subset)}
        for name, judge in judges.items():
            summary = judge.summarize([r["verdicts"][name] for r in subset])
            if clash := sorted(out.keys() & summary.keys()):
                raise ValueError(
                    f"Judge '{name}' reports metrics {clash} that another enabled judge reports too; "
                    "enable one judge of each type."
                )
            out.update(summary)
        if has_proxy:
            complied = [on_topic_compliance(r["verdicts"]["refusal"], r["verdicts"]["relevance"]) for r in subset]
            out["on_topic_compliance"] = 100.0 * sum(complied) / max(len(subset), 1)
        return out

    by_set, by_category = defaultdict(list), defaultdict(list)
    for row in rows:
        by_set[row["prompt_set"]].append(row)
        if row["category"]:
            by_category[row["category"]].append(row)
    overall = metrics(rows)

    described: dict[str, Any] = {}
    harmful: dict[str, list[bool | None]] = {}
    for name, judge in judges.items():
        summary = judge.summarize([r["verdicts"][name] for r in rows])
        described[name] = {**judge.describe(), "metrics": list(summary)}
        if hasattr(judge, "harmful"):
            harmful[name] = [judge.harmful(r["verdicts"][name]) for r in rows]
    if has_proxy:
        described[PROXY] = {
            "kind": "proxy",
            "model": described["relevance"]["model"],
            "prompt_file": None,
            "metrics": ["on_topic_compliance"],
            "derived_from": ["refusal", "relevance"],
            "harmful_when": "not refused and on topic (relevance above its threshold)",
        }
        harmful[PROXY] = [on_topic_compliance(r["verdicts"]["refusal"], r["verdicts"]["relevance"]) for r in rows]
    return {
        "judges": described,
        "overall": overall,
        "per_prompt_set": {k: metrics(v) for k, v in sorted(by_set.items())},
        "per_category": {k: metrics(v) for k, v in sorted(by_category.items())},
        "agreement": pairwise_agreement(harmful),
    }


def markdown_summary(results: dict[str, Any]) -> str:
    lines = [f"# Evaluation of `{results['model']}`", ""]
    generation = results.get("generation") or {}
    if generation.get("backend") == "openai":
        lines += [
            f"Answers: greedy, from `{generation['model']}` at {generation['endpoint']} "
            "(eval.generation.backend=openai).",
            "",
        ]
    harm = results.get("harmfulness")
    if harm:
        keys = [k for k in harm["overall"] if k != "num_prompts"]
        lines += [
            "## Harmfulness",
            "",
            "| prompt set | n | " + " | ".join(keys) + " |",
            "|---|---|" + "---|" * len(keys),
        ]
        for set_name, m in [("**all**", harm["overall"]), *harm["per_prompt_set"].items()]:
            lines.append(f"| {set_name} | {m['num_prompts']} | " + " | ".join(_fmt(m.get(k)) for k in keys) + " |")
        lines.append("")
    lines += _under_attack_lines(results.get("harmfulness_under_attack"))
    lines += benign_summary_lines(results.get("benign"))
    capability = results.get("capability")
    if capability:
        lines += ["## Capability", "", "| task | acc | acc_norm | n |", "|---|---|---|---|"]
        for task, m in capability.items():
            if isinstance(m, dict):
                lines.append(f"| {task} | {_fmt(m.get('acc'))} | {_fmt(m.get('acc_norm'))} | {m.get('num_samples')} |")
        lines.append("")
    lines.append(f"Wall time: {results['seconds']} s")
    return "\n".join(lines) + "\n"


def _under_attack_lines(under_attack: dict[str, Any] | None) -> list[str]:
    if not under_attack:
        return []
    keys = list(dict.fromkeys(k for v in under_attack.values() for k in v["overall"] if k != "num_prompts"))
    lines = [
        "## Harmfulness under evaluation-time attacks",
        "",
        "| attack | kind | n | " + " | ".join(keys) + " |",
        "|---|---|---|" + "---|" * len(keys),
    ]
    for variant, result in under_attack.items():
        m = result["overall"]
        lines.append(
            f"| {variant} | {result['attack']['kind']} | {m['num_prompts']} | "
            + " | ".join(_fmt(m.get(k)) for k in keys)
            + " |"
        )
    return lines + [""]


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
