"""General capability (MMLU, OpenBookQA, ARC-Challenge, ARC-Easy, HellaSwag, TruthfulQA MC1) through
lm-evaluation-harness.

``evaluate_capability(model, tokenizer, {"mmlu": "/data/mmlu.jsonl", "openbookqa": "hub"})`` scores
an in-memory transformers model with ``lm_eval``: each question's choices are ranked by the model's
log-likelihood of the choice given the prompt (lm-eval's ``multiple_choice`` output type), and
``acc`` is the fraction of questions whose gold choice ranks first.

A task maps to either

* a local file (``.jsonl``/``.json``, ``.parquet`` or ``.csv``) in the column layout of the task's
  Hub dataset (see ``lm_eval_tasks/README.md``). It is run through our task YAML
  ``lm_eval_tasks/sdd_<task>_local.yaml``, whose prompt is the stock lm-eval prompt; the file path is
  only known at run time, so the YAML is loaded as a template, its ``dataset_kwargs.data_files`` is
  filled in, and the resulting config dict is what lm-eval receives; or
* ``"hub"``: lm-eval's own stock task of that name, downloaded from the Hugging Face Hub.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, Mapping

from sdd.errors import ConfigError

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"

# Our name -> (local task YAML, lm-eval stock task or group, Hub dataset whose layout the file follows).
KNOWN_TASKS: dict[str, tuple[str, str, str]] = {
    "mmlu": ("sdd_mmlu_local.yaml", "mmlu", "cais/mmlu"),
    "openbookqa": ("sdd_openbookqa_local.yaml", "openbookqa", "allenai/openbookqa (main)"),
    "arc_challenge": ("sdd_arc_challenge_local.yaml", "arc_challenge", "allenai/ai2_arc (ARC-Challenge)"),
    "arc_easy": ("sdd_arc_easy_local.yaml", "arc_easy", "allenai/ai2_arc (ARC-Easy)"),
    "hellaswag": ("sdd_hellaswag_local.yaml", "hellaswag", "Rowan/hellaswag"),
    "truthfulqa_mc1": ("sdd_truthfulqa_mc1_local.yaml", "truthfulqa_mc1", "truthful_qa (multiple_choice)"),
}

# Top-level columns each local file must have (nested fields are checked by the utils normalizers).
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "mmlu": ("question", "choices", "answer"),
    "openbookqa": ("question_stem", "choices", "answerKey"),
    "arc_challenge": ("question", "choices", "answerKey"),
    "arc_easy": ("question", "choices", "answerKey"),
    "hellaswag": ("ctx", "endings", "label"),
    "truthfulqa_mc1": ("question", "mc1_targets"),
}

# Columns the prompts also use when a file has them.
OPTIONAL_COLUMNS: dict[str, tuple[str, ...]] = {"mmlu": ("subject",), "hellaswag": ("activity_label", "ctx_a", "ctx_b")}

# File suffix -> datasets packaged builder (lm-eval's dataset_path).
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

HUB = "hub"


def evaluate_capability(
    model,
    tokenizer,
    tasks: Mapping[str, str | Path],
    batch_size: int = 8,
    limit: int | None = None,
    num_fewshot: int = 0,
    device: str | None = None,
) -> dict[str, Any]:
    """Score a causal LM on multiple-choice capability benchmarks with lm-evaluation-harness.

    Args:
        model: A transformers causal LM (``PreTrainedModel``), already loaded. lm-eval puts it in
            eval mode (and calls ``tie_weights``); its training mode is restored afterwards.
        tokenizer: The model's transformers tokenizer. lm-eval gives it a pad token if it has none.
        tasks: Task name (``mmlu``, ``openbookqa``, ``arc_challenge``, ``arc_easy``, ``hellaswag``,
            ``truthfulqa_mc1``) -> a local file (jsonl/json/parquet/csv in the Hub dataset's columns)
            or ``"hub"`` for lm-eval's stock task, which downloads the dataset.
        batch_size: Requests per forward pass.
        limit: Evaluate only the first ``limit`` questions of each task (a float < 1 is a fraction);
            None evaluates all.
        num_fewshot: Solved examples put before each question, drawn from the same file (never the
            question itself). TruthfulQA MC1 keeps its fixed primer and ignores this, as in lm-eval.
        device: Move the model there first (e.g. ``"cuda"``); None leaves it where it is. lm-eval
            runs on the model's device and ignores its own ``device`` argument for a model object.

    Returns:
        ``{task: {"acc": float, "acc_norm": float | None, "num_samples": int}, ...,
        "lm_eval_version": str}``. ``acc_norm`` ranks choices by log-likelihood per character; it
        is None for MMLU and TruthfulQA MC1, which lm-eval scores by ``acc`` only. ``num_samples``
        is the number of questions scored (after ``limit``). For ``"hub"`` MMLU the numbers are
        lm-eval's ``mmlu`` group: ``acc`` over all 57 subjects' questions.

    Raises:
        ValueError: An unknown task name, an unsupported file type, no tasks, or a file lacking a
            needed column or holding a malformed row.
        FileNotFoundError: A task's local file does not exist.
    """
    if not tasks:
        raise ConfigError(
            f"eval.capability.enabled=true but no task has a source (eval.capability.tasks; known: "
            f"{sorted(KNOWN_TASKS)}). Fix: set eval.capability.tasks.<task>=<local file> or hub, or "
            "eval.capability.enabled=false (the corpus names none: corpus=local sets them to null)."
        )
    unknown = sorted(set(tasks) - set(KNOWN_TASKS))
    if unknown:
        raise ValueError(f"Unknown capability task(s) {unknown}; known tasks: {sorted(KNOWN_TASKS)}")

    # Resolve and check every file before loading lm-eval or touching the model: fail in seconds.
    specs: list[dict[str, Any] | str] = []
    harness_names: dict[str, str] = {}  # lm-eval result key -> our task name
    for name, source in tasks.items():
        if isinstance(source, str) and source.strip().lower() == HUB:
            specs.append(KNOWN_TASKS[name][1])
            harness_names[KNOWN_TASKS[name][1]] = name
        else:
            config = local_task_config(name, source, num_fewshot=num_fewshot)
            specs.append(config)
            harness_names[config["task"]] = name

    import lm_eval
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # Indexing lm-eval's thousands of stock YAMLs takes ~20 s: only do it when a stock task is used.
    needs_stock = any(isinstance(spec, str) for spec in specs)
    task_manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=needs_stock)

    if device is not None:
        model.to(device)
    was_training = model.training
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        output = simple_evaluate(
            model=lm,
            tasks=specs,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=task_manager,
            bootstrap_iters=0,  # no stderr: we report point estimates only
            log_samples=False,
        )
    finally:
        model.train(was_training)

    results: dict[str, Any] = {}
    for key, name in harness_names.items():
        metrics = output["results"][key]
        results[name] = {
            "acc": _metric(metrics, "acc"),
            "acc_norm": _metric(metrics, "acc_norm"),
            "num_samples": int(metrics["sample_len"]),  # tasks and groups alike
        }
        log.info(
            "capability %s: acc=%s acc_norm=%s n=%d",
            name,
            results[name]["acc"],
            results[name]["acc_norm"],
            results[name]["num_samples"],
        )
    results["lm_eval_version"] = lm_eval.__version__
    return results


def local_task_config(name: str, path: str | Path, num_fewshot: int = 0) -> dict[str, Any]:
    """The lm-eval task config dict for ``name`` read from the local file ``path``.

    Our YAML template with its ``!function`` hooks resolved (by lm-eval's own YAML loader, so the
    result is what ``--include_path`` would give), ``dataset_path`` set from the file suffix and
    ``dataset_kwargs.data_files`` set to the file. The file is checked first.

    Args:
        name: One of :data:`KNOWN_TASKS`.
        path: The local data file (``demo:<name>`` for a file of the shipped demo corpus).
        num_fewshot: Shots that will be drawn from the same file; checked against its size.

    Returns:
        A config dict accepted in ``lm_eval.simple_evaluate(tasks=[...])``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: Unknown task, unsupported suffix, unreadable or empty file, missing columns, a
            malformed row, or more shots than the file can give.
    """
    if name not in KNOWN_TASKS:
        raise ValueError(f"Unknown capability task {name!r}; known tasks: {sorted(KNOWN_TASKS)}")
    if str(path).startswith("demo:"):  # a file of the demo corpus shipped in the package
        from sdd.data.sources import DEMO_DIR

        path = DEMO_DIR / str(path)[len("demo:") :]
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Capability task {name!r}: no file at {path} (set by eval.capability.tasks.{name}; "
            f"give a local jsonl/json/parquet/csv file in the {KNOWN_TASKS[name][2]} layout, or 'hub')"
        )
    path = path.resolve()
    builder = FORMATS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"Capability task {name!r}: {path} (eval.capability.tasks.{name}) has suffix {path.suffix!r}; "
            f"supported: {sorted(FORMATS)}"
        )
    num_rows = _check_file(name, path, builder)

    config = _load_task_yaml(TASKS_DIR / KNOWN_TASKS[name][0])
    # Shots come from the other rows of the file; lm-eval would otherwise fail deep in its sampler.
    if config.get("num_fewshot") != 0 and num_fewshot >= num_rows:
        raise ValueError(
            f"Capability task {name!r}: num_fewshot={num_fewshot} needs more than {num_fewshot} rows in "
            f"{path} (eval.capability.tasks.{name}), which has {num_rows}"
        )
    config["dataset_path"] = builder
    # A named split so that test_split/fewshot_split in the YAML ("test") exist whatever the format.
    config["dataset_kwargs"] = {**(config.get("dataset_kwargs") or {}), "data_files": {"test": str(path)}}
    return config


def _check_file(name: str, path: Path, builder: str) -> int:
    """The number of rows of ``path``; a ValueError naming the expected columns if it cannot feed ``name``."""
    import datasets

    where = f"Capability task {name!r}: {path} (eval.capability.tasks.{name})"
    if path.stat().st_size == 0:  # datasets fails on it with a bare StopIteration
        raise ValueError(f"{where} is empty.")
    try:
        # The same call lm-eval makes (it then reuses this load from the datasets cache).
        dataset = datasets.load_dataset(builder, data_files={"test": str(path)}, split="test")
    except Exception as err:  # datasets' own message is a generic "error while generating"
        cause = err.__cause__ or err
        raise ValueError(f"{where} cannot be read as {builder}: {type(cause).__name__}: {cause}") from err
    expected = REQUIRED_COLUMNS[name]
    missing = [c for c in expected if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{where} lacks column(s) {missing}. Expected columns {list(expected)} "
            f"(the {KNOWN_TASKS[name][2]} layout); found {dataset.column_names}."
        )
    if len(dataset) == 0:
        raise ValueError(f"{where} holds no rows.")
    # Every row, here, so that a bad one is reported with its file and index instead of failing
    # later inside lm-eval's dataset.map.
    normalize = _task_utils().NORMALIZERS[name]
    used = [c for c in dataset.column_names if c in expected or c in OPTIONAL_COLUMNS.get(name, ())]
    for index, row in enumerate(dataset.select_columns(used)):
        try:
            normalize(row)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(
                f"{where}: row {index} does not fit the {KNOWN_TASKS[name][2]} layout (columns {list(expected)}): {err}"
            ) from err
    return len(dataset)


def _load_task_yaml(path: Path) -> dict[str, Any]:
    """A task YAML as lm-eval reads it (``!function`` resolved relative to the YAML)."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml  # the loader of lm-eval 0.4.13
    except ImportError:  # older 0.4.x releases
        from lm_eval.utils import load_yaml_config

        return load_yaml_config(str(path), mode="full")
    return load_yaml(path, resolve_func=True)


def _task_utils():
    """``lm_eval_tasks/utils.py`` (a folder of task files, not a package) as a module."""
    module_name = "sdd.evaluation._lm_eval_task_utils"
    import sys

    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, TASKS_DIR / "utils.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[module_name] = module
    return sys.modules[module_name]


def _metric(metrics: dict[str, Any], name: str) -> float | None:
    # lm-eval keys metrics as "<metric>,<filter>"; our tasks and the stock ones use the "none" filter.
    value = metrics.get(f"{name},none")
    return None if value is None or value == "N/A" else float(value)
