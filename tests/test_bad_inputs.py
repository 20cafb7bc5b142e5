"""Nothing silently wrong (issue 12): bad input gets one clear line naming the fix, runs that exit 0 are right,
and every failure is recoverable.

What the user sees is tested through the real entry points (``train.py``, ``evaluate.py``, ...): in-process
through Hydra's own ``main`` (the same code path as the command line, without paying the start-up of a new
Python per case), and as real subprocesses for the exit status and stderr of a fresh process (a few here,
every case with ``-m slow``). The kill -9 test runs ``pipeline.py`` as a subprocess and kills it mid-attack.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import lightning as L
import pytest
import torch
from conftest import ROOT, compose_config
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate

from sdd.backbones import Backbone, BackboneError
from sdd.data.sources import DataSource, DataSourceError, load_records


def test_missing_file_names_the_key(tmp_path):
    with pytest.raises(DataSourceError, match=r"file not found.*Fix corpus\.harmful\.path"):
        load_records({"name": "corpus.harmful", "path": str(tmp_path / "nope.jsonl"), "columns": {"instruction": "p"}})


def test_malformed_jsonl(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": "broken\n')
    with pytest.raises(DataSourceError, match="could not parse"):
        load_records({"path": str(bad), "columns": {"instruction": "prompt"}})


def test_unknown_file_format(tmp_path):
    odd = tmp_path / "data.xlsx"
    odd.write_text("x")
    with pytest.raises(DataSourceError, match="csv"):
        load_records({"path": str(odd), "columns": {"instruction": "prompt"}})


def test_misnamed_column_lists_the_real_ones(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("question,reply\nq1,a1\n")
    with pytest.raises(DataSourceError) as error:
        load_records({"name": "corpus.refusals", "path": str(path), "columns": {"instruction": "prompt"}})
    message = str(error.value)
    assert "'prompt' not found" in message and "question" in message and "corpus.refusals.columns" in message


def test_filter_that_leaves_nothing(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "p", "is_safe": True}) + "\n")
    with pytest.raises(DataSourceError, match="where"):
        load_records({"path": str(path), "columns": {"instruction": "prompt"}, "where": {"is_safe": False}})


def test_csv_booleans_filter_like_booleans(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,is_safe\na,False\nb,True\n")
    records = load_records({"path": str(path), "columns": {"instruction": "prompt"}, "where": {"is_safe": False}})
    assert records == [{"instruction": "a"}]


def test_nested_columns(tmp_path):
    path = tmp_path / "lima.jsonl"
    path.write_text(json.dumps({"conversations": ["question", "answer"]}) + "\n")
    assert load_records({"path": str(path), "columns": {"answer": "conversations.1"}}) == [{"answer": "answer"}]


def test_unknown_source_key():
    with pytest.raises(DataSourceError, match="Unknown key"):
        DataSource.from_config({"file": "x.csv"})


def test_hub_unreachable_says_which_data_set_and_how_to_pass_a_file():
    # Tests run with HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1, as on a machine without the Hub.
    with pytest.raises(DataSourceError) as error:
        load_records(
            {
                "name": "corpus.harmful",
                "hub_id": "PKU-Alignment/BeaverTails",
                "split": "30k_train",
                "columns": {"instruction": "prompt"},
            }
        )
    message = str(error.value)
    assert "PKU-Alignment/BeaverTails" in message
    assert "corpus.harmful.path=" in message


def test_unknown_backbone_config_lists_options(tmp_path):
    with pytest.raises((MissingConfigException, ConfigCompositionException)) as error:
        compose_config("train", ["backbone=gpt5"], output_dir=tmp_path)
    assert "smollm2_135m_instruct" in str(error.value)


def test_unknown_config_key_is_refused(tmp_path):
    with pytest.raises(ConfigCompositionException, match="data.batchsize"):
        compose_config("train", ["data.batchsize=3"], output_dir=tmp_path)


def test_backbone_not_found_names_the_fix(tmp_path):
    backbone = Backbone(name="custom", source="pretrained", name_or_path=str(tmp_path / "no-model"))
    with pytest.raises(BackboneError, match="backbone.name_or_path"):
        backbone.load_tokenizer()


def test_unknown_backbone_source():
    with pytest.raises(BackboneError, match="backbone.source"):
        Backbone(name="x", source="ollama")


def test_unmapped_required_column(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(DataSourceError, match=r"corpus\.refusals\.columns\.answer="):
        load_records(
            {"name": "corpus.refusals", "path": str(path), "columns": {"instruction": "prompt"}},
            required=["instruction", "answer"],
        )


# ============================================================================ running an entry point
PROGRESS_BAR = re.compile(r"\[\d\d:\d\d")  # tqdm's elapsed time: "Loading weights: 100%|...| 3/3 [00:00<00:00, ...]"


@dataclass
class Outcome:
    """What a user sees from one command: exit status, stdout and stderr."""

    status: int
    stdout: str
    stderr: str

    @property
    def message(self) -> str:
        """The one error line, the last on stderr; fails unless there is exactly one and no traceback.

        Progress bars and Lightning's own ``INFO:`` lines may come before it, as in any run.
        """
        lines = [line for line in self.stderr.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
        errors = [line for line in lines if line.startswith("Error: ")]
        assert len(errors) == 1 and lines[-1] == errors[0], "expected one last error line:\n" + "\n".join(lines[-20:])
        assert "Traceback" not in self.stderr
        return errors[0]


def run_entry(script: str, *args: str, env: dict[str, str] | None = None, fresh_process: bool = False) -> Outcome:
    """Run ``python <script> <args>`` from the repository root: in a new process, or in this one through
    the script's own ``__main__`` (Hydra's main, its callbacks and our error handling all run)."""
    env = {"WANDB_MODE": "disabled", **(env or {})}
    if fresh_process:
        result = subprocess.run(
            [sys.executable, script, *args],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=900,
        )
        return Outcome(result.returncode, result.stdout, result.stderr)
    from hydra.core.global_hydra import GlobalHydra

    root_logger = logging.getLogger()
    saved_handlers, saved_level = list(root_logger.handlers), root_logger.level
    saved_argv, saved_env = sys.argv, dict(os.environ)
    stdout, stderr, status = io.StringIO(), io.StringIO(), 0
    os.environ.update(env)
    sys.argv = [str(ROOT / script), *args]
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                runpy.run_path(str(ROOT / script), run_name="__main__")
            except SystemExit as exit_:
                status = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        GlobalHydra.instance().clear()
        root_logger.handlers[:] = saved_handlers
        root_logger.setLevel(saved_level)
    return Outcome(status, stdout.getvalue(), stderr.getvalue())


def tree_state(folder: Path, skip: Callable[[Path], bool] = lambda path: False) -> dict[str, tuple[int, str]]:
    """``{relative path: (mtime_ns, sha256)}`` of every file under ``folder``."""
    state = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not skip(path):
            state[str(path.relative_to(folder))] = (
                path.stat().st_mtime_ns,
                hashlib.sha256(path.read_bytes()).hexdigest(),
            )
    return state


@pytest.fixture
def tiny_model(tiny_backbone) -> Path:
    """A saved transformers folder (the tiny backbone, as train.py writes models)."""
    return Path(tiny_backbone.resolve())


# ============================================================================ the unclear messages
# Each case: files it needs -> (entry point, arguments, what the one line must say, what must not be written).
def _empty_answers(tmp_path, model):
    (tmp_path / "ea.csv").write_text("answer,note\n,x\n,y\n")  # the command: every answer cell empty
    # The demo's answer pool also maps `instruction`, only to pick its train part (sdd/data/splits.py).
    return (
        "train.py",
        [
            "backbone=tiny_llama",
            "prepare_only=true",
            f"corpus.answers.demo_benign.path={tmp_path / 'ea.csv'}",
            "corpus.answers.demo_benign.columns.instruction=note",
        ],
        [
            r"corpus\.answers\.demo_benign: no usable row",
            "missing or empty",
            r"corpus\.answers\.demo_benign\.columns\.answer=",
        ],
    )


def _non_utf8(tmp_path, model):
    (tmp_path / "latin1.csv").write_bytes("instruction,category\ncaf\xe9 au lait,x\n".encode("latin-1"))
    return (
        "train.py",
        ["backbone=tiny_llama", "prepare_only=true", f"corpus.harmful.path={tmp_path / 'latin1.csv'}"],
        ["corpus.harmful", "latin1.csv is not UTF-8", "byte 0xe9 at line 2", "iconv -f latin1"],
    )


def _empty_file(tmp_path, model):
    (tmp_path / "empty.jsonl").write_text("")
    return (
        "train.py",
        ["backbone=tiny_llama", "prepare_only=true", f"corpus.harmful.path={tmp_path / 'empty.jsonl'}"],
        ["empty.jsonl is empty", r"Fix corpus\.harmful\.path"],
    )


def _max_steps_text(tmp_path, model):
    return (
        "train.py",
        ["backbone=tiny_llama", "trainer.max_steps=abc"],
        [r"trainer\.max_steps must be an integer, got 'abc'", r"trainer\.max_steps=<integer>"],
    )


def _missing_model_folder(tmp_path, model):
    return "evaluate.py", [f"model={tmp_path / 'nowhere' / 'model'}"], ["Model folder not found", r"Fix: model="]


def _empty_model_folder(tmp_path, model):
    (tmp_path / "empty_model").mkdir()
    return (
        "evaluate.py",
        [f"model={tmp_path / 'empty_model'}", "eval.judges.relevance.enabled=false"],
        ["holds no config.json", r"Fix: model="],
    )


def _truncated_safetensors(tmp_path, model):
    copy = shutil.copytree(model, tmp_path / "truncated_model")
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return (
        "evaluate.py",
        [f"model={copy}", "eval.judges.relevance.enabled=false"],
        ["model.safetensors is damaged or incomplete", "copy the folder again"],
    )


def _broken_chat_template(tmp_path, model):
    return (
        "train.py",
        ["experiment=quick_tiny", "backbone.chat_template='{% for m in messages %}{{ m.content }'"],
        ["chat template does not render", "TemplateSyntaxError", r"Fix backbone\.chat_template"],
    )


def _template_drops_answer(tmp_path, model):
    template = '{% for m in messages %}{% if m.role == "user" %}{{ m.content }}{% endif %}{% endfor %}'
    return (
        "train.py",
        ["experiment=quick_tiny", f"backbone.chat_template='{template}'"],
        [r"backbone\.chat_template drops the assistant's answer", r"Fix backbone\.chat_template"],
    )


def _trainer_gpu(tmp_path, model):
    return "train.py", ["experiment=quick_tiny", "trainer=gpu"], ["needs a CUDA GPU", "Fix: trainer=cpu"]


def _eval_device_cuda(tmp_path, model):
    return "evaluate.py", [f"model={model}", "eval.device=cuda"], [r"eval\.device=cuda", r"Fix: eval\.device=cpu"]


def _unknown_category(tmp_path, model):
    return (
        "train.py",
        ["experiment=quick_tiny", "prepare_only=true", "data.builder.categories=[animal_abuse,not_a_category]"],
        [r"\['not_a_category'\]", r"Valid: \['animal_abuse', 'child_abuse'", r"Fix data\.builder\.categories"],
    )


MESSAGE_CASES = {
    f.__name__.strip("_"): f
    for f in [
        _empty_answers,
        _non_utf8,
        _empty_file,
        _max_steps_text,
        _missing_model_folder,
        _empty_model_folder,
        _truncated_safetensors,
        _broken_chat_template,
        _template_drops_answer,
        _trainer_gpu,
        _eval_device_cuda,
        _unknown_category,
    ]
}
NEEDS_NO_GPU = {"trainer_gpu", "eval_device_cuda"}


def check_message_case(name, tmp_path, cache_dir, model, fresh_process):
    if name in NEEDS_NO_GPU and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    script, args, expected = MESSAGE_CASES[name](tmp_path, model)
    run_dir = tmp_path / "run"
    outcome = run_entry(
        script, *args, f"hydra.run.dir={run_dir}", env={"SDD_CACHE_DIR": str(cache_dir)}, fresh_process=fresh_process
    )
    assert outcome.status == 1
    line = outcome.message
    assert line.startswith("Error: ") and "Traceback" not in outcome.stderr
    for pattern in expected:
        assert re.search(pattern, line), f"{pattern!r} not in: {line}"
    assert "max_length" not in line  # the old, wrong advice for a template that drops the answer
    # Nothing was produced from the bad input: no data set, no model, no recorded config of a run.
    assert not any(
        (run_dir / name).exists() for name in ("data_manifest.json", "model", "results.json", "train_summary.json")
    )


@pytest.mark.parametrize("name", sorted(MESSAGE_CASES))
def test_each_unclear_message_is_one_line_naming_the_fix(name, tmp_path, cache_dir, tiny_model):
    check_message_case(name, tmp_path, cache_dir, tiny_model, fresh_process=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MESSAGE_CASES))
def test_each_unclear_message_in_a_fresh_process(name, tmp_path, cache_dir, tiny_model):
    check_message_case(name, tmp_path, cache_dir, tiny_model, fresh_process=True)


def test_a_fresh_process_prints_one_line_and_the_traceback_only_with_hydra_full_error(tmp_path):
    args = ["train.py", "trainer.max_steps=abc", f"hydra.run.dir={tmp_path / 'run'}"]
    base = {**os.environ, "WANDB_MODE": "disabled"}
    base.pop("HYDRA_FULL_ERROR", None)
    quiet, full = (
        subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for env in (base, {**base, "HYDRA_FULL_ERROR": "1"})
    )
    (_, quiet_err), (_, full_err) = quiet.communicate(timeout=600), full.communicate(timeout=600)
    assert quiet.returncode == 1 and full.returncode == 1
    assert quiet_err.strip().splitlines() == [
        "Error: trainer.max_steps must be an integer, got 'abc'. Fix: trainer.max_steps=<integer>."
    ]
    assert "Traceback" in full_err and "sdd.errors.ConfigError" in full_err


def test_a_bug_keeps_its_traceback():
    from sdd.cli import user_errors

    @user_errors
    def broken():
        raise KeyError("not a user error")

    with pytest.raises(KeyError):
        broken()


def test_a_full_disk_is_a_one_line_message():
    from sdd.cli import user_message

    error = OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoints/last.ckpt.partial")
    message = user_message(RuntimeError("wrapped"))  # no user error in the chain: a bug, not a message
    assert message is None
    try:
        raise RuntimeError("the checkpoint save failed") from error
    except RuntimeError as wrapped:
        message = user_message(wrapped)
    assert message.startswith("No space left on device while writing /runs/x/checkpoints/last.ckpt.partial")
    assert "hydra.run.dir=" in message and "\n" not in message


# ============================================================================ 1. missing values
def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_empty_csv_cells_are_dropped_counted_and_warned(tmp_path, caplog):
    path = tmp_path / "answers.csv"
    path.write_text("answer,note\n,x\nA real answer.,y\n   ,z\nAnother one.,w\n")
    with caplog.at_level(logging.WARNING, logger="sdd.data.sources"):
        records = load_records(
            {"name": "corpus.answers.mine", "path": str(path), "columns": {"answer": "answer"}}, required=["answer"]
        )
    assert records == [{"answer": "A real answer."}, {"answer": "Another one."}]
    assert records.dropped_missing == 2
    assert "corpus.answers.mine: 2 of 4 rows dropped" in caplog.text


def test_missing_values_of_every_shape_are_dropped_but_optional_columns_may_be_empty(tmp_path):
    rows = [
        {"q": "kept", "a": "yes", "c": None},
        {"q": None, "a": "x"},
        {"a": "no q key"},
        {"q": "blank", "a": " "},
        {"q": "empty list", "a": []},
        {"q": "nan", "a": float("nan")},
        {"q": "also kept", "a": "ok"},
    ]
    records = load_records(
        {"path": str(write_rows(tmp_path / "rows.jsonl", rows)), "columns": {"instruction": "q", "answer": "a"}},
        required=["instruction", "answer"],
    )
    assert [r["instruction"] for r in records] == ["kept", "also kept"] and records.dropped_missing == 5
    nested = [{"turns": ["question", "answer"]}, {"turns": ["question only"]}, {"turns": None}]
    records = load_records(
        {"path": str(write_rows(tmp_path / "nested.jsonl", nested)), "columns": {"answer": "turns.1"}},
        required=["answer"],
    )
    assert records == [{"answer": "answer"}] and records.dropped_missing == 2


def _sources_with_gaps(tmp_path):
    """One file per source kind, each with two rows lacking a required value."""
    qa = [
        {"instruction": f"question {i}", "answer": f"answer {i}", "safe": f"I refuse {i}.", "unsafe": f"Sure {i}."}
        for i in range(4)
    ]
    qa += [
        {"instruction": "", "answer": "orphan", "safe": "x", "unsafe": "y"},
        {"instruction": "no answer", "answer": None, "safe": None, "unsafe": None},
    ]
    conversations = [
        {"conversations": [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": f"hello {i}"}]}
        for i in range(3)
    ] + [{"conversations": []}, {"conversations": None}]
    return {
        "qa": str(write_rows(tmp_path / "qa.jsonl", qa)),
        "conversations": str(write_rows(tmp_path / "conversations.jsonl", conversations)),
    }


@pytest.mark.parametrize("kind", ["instructions_answers", "refusals", "conversations", "preference", "safety_recovery"])
def test_every_training_source_kind_counts_its_dropped_rows(kind, tmp_path, tiny_tokenizer):
    from sdd.datamodules.conversations import InstructionAnswerDataModule, MultiTurnDataModule
    from sdd.datamodules.preference import PreferenceDataModule
    from sdd.datamodules.safety_recovery import SafetyRecoveryDataModule

    files = _sources_with_gaps(tmp_path)
    qa = {"name": "corpus.x", "path": files["qa"]}
    modules = {
        "instructions_answers": lambda: InstructionAnswerDataModule(
            {**qa, "columns": {"instruction": "instruction", "answer": "answer"}}
        ),
        "refusals": lambda: InstructionAnswerDataModule(
            {**qa, "columns": {"instruction": "instruction", "answer": "safe"}}
        ),
        "conversations": lambda: MultiTurnDataModule(
            {"name": "corpus.x", "path": files["conversations"], "columns": {"conversations": "conversations"}}
        ),
        "preference": lambda: PreferenceDataModule(
            {**qa, "columns": {"instruction": "instruction", "safe": "safe", "unsafe": "unsafe"}}
        ),
        "safety_recovery": lambda: SafetyRecoveryDataModule(
            {**qa, "columns": {"instruction": "instruction", "safe": "safe", "unsafe": "unsafe"}}
        ),
    }
    datamodule = modules[kind]()
    datamodule.batch_size, datamodule.max_length = 2, 96
    datamodule.connect(tiny_tokenizer)
    datamodule.setup("fit")
    assert datamodule.stats["dropped_missing_values"] == {"corpus.x": 2}
    assert datamodule.stats["train_examples"] == (3 if kind == "conversations" else 4)


def test_sdd_pairs_and_evaluation_prompts_count_their_dropped_rows(tmp_path, caplog):
    from test_sdd_pairs import CountingEmbedder

    from sdd.datamodules.sdd_pairs import SDDPairBuilder
    from sdd.evaluation.run import load_prompt_sets

    harmful = write_rows(
        tmp_path / "harmful.jsonl",
        [{"prompt": f"request {i}", "category": "c"} for i in range(6)] + [{"prompt": "", "category": "c"}],
    )
    answers = tmp_path / "answers.csv"
    answers.write_text("output\n" + "".join(f"An answer about plants {i}.\n" for i in range(5)) + '""\n""\n')
    builder = SDDPairBuilder(
        harmful={
            "name": "corpus.harmful",
            "path": str(harmful),
            "columns": {"instruction": "prompt", "category": "category"},
        },
        answers={"alpaca": {"name": "corpus.answers.alpaca", "path": str(answers), "columns": {"answer": "output"}}},
        num_pairs=8,
        cache_dir=tmp_path / "pairs",
    )
    pairs, manifest = builder.build(CountingEmbedder())
    assert manifest["dropped_missing_values"] == {"corpus.harmful": 1, "corpus.answers.alpaca": 2}
    assert all(p["answer"] not in ("", "None") and p["instruction"] not in ("", "None") for p in pairs)

    prompts = tmp_path / "prompts.csv"
    prompts.write_text("goal\nHow do I pick a lock?\n\nHow do I hotwire a car?\n")
    with caplog.at_level(logging.WARNING, logger="sdd.data.sources"):
        rows = load_prompt_sets({"advbench": {"path": str(prompts), "columns": {"prompt": "goal"}}}, None)
    assert [r["prompt"] for r in rows] == ["How do I pick a lock?", "How do I hotwire a car?"]
    empty_cell = tmp_path / "one_empty.csv"
    empty_cell.write_text("goal,target\n,Sure\nHow do I pick a lock?,Sure\n")
    with caplog.at_level(logging.WARNING, logger="sdd.data.sources"):
        rows = load_prompt_sets({"advbench": {"path": str(empty_cell), "columns": {"prompt": "goal"}}}, None)
    assert len(rows) == 1 and "corpus.eval_prompts.advbench: 1 of 2 rows dropped" in caplog.text


def test_partly_empty_answers_train_on_the_real_ones_only(tiny_train_config, tmp_path):
    from sdd.training import train

    answers = tmp_path / "ea.csv"
    answers.write_text("answer,note\n,x\nKeep basil in a sunny window and water it when the soil is dry.,y\n \t,z\n")
    summary = train(
        tiny_train_config(
            "prepare_only=true",
            f"corpus.answers.demo_benign.path={answers}",
            "corpus.answers.demo_benign.columns.instruction=note",
        )
    )
    manifest = summary["data_manifest"]
    assert manifest["dropped_missing_values"]["corpus.answers.demo_benign"] == 2
    assert manifest["answers_available"] == 1
    pairs = Path(tiny_train_config().paths.cache_dir) / "sdd_pairs" / manifest["config_hash"] / "pairs.jsonl"
    assert {json.loads(line)["answer"] for line in pairs.read_text().splitlines()} == {
        "Keep basil in a sunny window and water it when the soil is dry."
    }


# ============================================================================ 3, 4, 7. run folders
class Crash(L.Callback):
    """Stops the run after a given optimizer step, as a pre-empted job would be."""

    def __init__(self, after_step: int) -> None:
        self.after_step = after_step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.after_step:
            raise RuntimeError("simulated crash")


class RecordStart(L.Callback):
    def on_train_start(self, trainer, module) -> None:
        self.first_step = trainer.global_step


def with_callback(monkeypatch, callback) -> None:
    """Add ``callback`` to the Trainer that ``sdd.training`` builds."""
    original = instantiate

    def patched(config, *args, **kwargs):
        if config.get("_target_") == "lightning.pytorch.Trainer":
            kwargs["callbacks"] = [*kwargs.get("callbacks", []), callback]
        return original(config, *args, **kwargs)

    monkeypatch.setattr("sdd.training.instantiate", patched)


def crashed_run(tiny_train_config, monkeypatch, *overrides):
    """A run killed after step 6 of 10, with checkpoints at steps 2 and 4 (last.ckpt = step 4)."""
    from sdd.training import train

    cfg = tiny_train_config("trainer.max_steps=10", "checkpoint.every_n_steps=2", "sample_prompts=null", *overrides)
    with_callback(monkeypatch, Crash(after_step=6))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg)
    return cfg, Path(cfg.paths.output_dir)


def test_resume_with_changed_overrides_is_refused_naming_the_keys(tiny_train_config, monkeypatch, cache_dir):
    cfg, run = crashed_run(tiny_train_config, monkeypatch)
    before = tree_state(run)
    outcome = run_entry(
        "train.py",
        "experiment=quick_tiny",
        "trainer.max_steps=10",
        "data.num_examples=48",
        "checkpoint.every_n_steps=2",
        "sample_max_new_tokens=8",
        "sample_prompts=null",
        "optimizer.lr=1e-3",
        f"hydra.run.dir={run}",
        env={"SDD_CACHE_DIR": str(cache_dir)},
    )
    assert outcome.status == 1
    assert re.search(r"optimizer\.lr: 0\.003 -> 0\.001", outcome.message)
    assert "resume=false" in outcome.message and "hydra.run.dir=<new folder>" in outcome.message
    assert (
        tree_state(run, skip=lambda p: ".hydra" in p.parts or p.suffix == ".log") == before
    )  # config.yaml, last.ckpt kept


def test_resume_ignores_paths_and_run_length_and_resume_false_starts_afresh(tiny_train_config, monkeypatch):
    from sdd.training import RESUME_IGNORED, train

    assert {"paths", "trainer.max_steps", "logger", "checkpoint"} <= set(RESUME_IGNORED)
    cfg, run = crashed_run(tiny_train_config, monkeypatch)
    recorder = RecordStart()
    with_callback(monkeypatch, recorder)
    longer = tiny_train_config("trainer.max_steps=12", "checkpoint.every_n_steps=3", "sample_prompts=null")
    assert train(longer)["global_step"] == 12 and recorder.first_step == 4  # resumed: only run length changed

    cfg, run = crashed_run(tiny_train_config, monkeypatch, "optimizer.lr=1e-3", "overwrite=true")
    recorder = RecordStart()
    with_callback(monkeypatch, recorder)
    fresh = tiny_train_config(
        "trainer.max_steps=10", "sample_prompts=null", "optimizer.lr=1e-2", "resume=false", "overwrite=true"
    )
    assert train(fresh)["global_step"] == 10 and recorder.first_step == 0
    assert "lr: 0.01" in (run / "config.yaml").read_text()


def test_a_finished_run_folder_is_not_overwritten_without_overwrite_true(tiny_train_config, cache_dir):
    from sdd.training import train

    cfg = tiny_train_config("trainer.max_steps=2", "sample_prompts=null")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    before = tree_state(run)
    args = [
        "experiment=quick_tiny",
        "trainer.max_steps=2",
        "data.num_examples=48",
        "sample_prompts=null",
        f"hydra.run.dir={run}",
    ]
    outcome = run_entry("train.py", *args, env={"SDD_CACHE_DIR": str(cache_dir)})
    assert outcome.status == 1 and "already holds a finished run" in outcome.message
    assert "overwrite=true" in outcome.message
    assert tree_state(run, skip=lambda p: ".hydra" in p.parts or p.suffix == ".log") == before

    assert run_entry("train.py", *args, "overwrite=true", env={"SDD_CACHE_DIR": str(cache_dir)}).status == 0
    after = tree_state(run)
    assert after["model/model.safetensors"][0] > before["model/model.safetensors"][0]  # replaced, as asked
    assert not list(run.glob("model.*"))  # no staging folder left beside it


def test_a_pipeline_stage_without_its_record_is_trained_again(tiny_train_config):
    from sdd.pipeline import _train_stage
    from sdd.training import train

    cfg = tiny_train_config("trainer.max_steps=2", "sample_prompts=null")
    train(cfg)  # a stage that saved its model but was killed before its stage.json
    assert _train_stage(cfg)["global_step"] == 2


def test_a_truncated_checkpoint_is_set_aside_and_the_previous_good_one_used(tiny_train_config, monkeypatch):
    from sdd.training import train

    cfg, run = crashed_run(tiny_train_config, monkeypatch, "checkpoint.keep_after_fit=true")
    checkpoints = run / "checkpoints"
    shutil.copy(checkpoints / "last.ckpt", checkpoints / "step-4.ckpt")  # an older good checkpoint
    last = checkpoints / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])  # as a full disk used to leave it
    recorder = RecordStart()
    with_callback(monkeypatch, recorder)
    assert train(cfg)["global_step"] == 10
    assert recorder.first_step == 4  # from step-4.ckpt
    assert (checkpoints / "last.ckpt.corrupt").exists()  # set aside, not deleted
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 10


def test_a_corrupt_checkpoint_alone_means_a_fresh_start_with_a_warning(tiny_train_config, monkeypatch, caplog):
    from sdd.training import train

    cfg = tiny_train_config("trainer.max_steps=4", "sample_prompts=null")
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    recorder = RecordStart()
    with_callback(monkeypatch, recorder)
    with caplog.at_level(logging.WARNING, logger="sdd.training"):
        assert train(cfg)["global_step"] == 4
    assert recorder.first_step == 0
    assert "does not load" in caplog.text and "starting afresh" in caplog.text
    assert (checkpoints / "last.ckpt.corrupt").read_bytes() == b"PK\x03\x04 truncated"  # kept, set aside


def test_a_full_disk_while_checkpointing_keeps_the_last_complete_checkpoint(tiny_train_config, monkeypatch):
    """The write fails halfway through the second checkpoint: last.ckpt is still the first one, whole."""
    import lightning.fabric.plugins.io.torch_io as torch_io

    from sdd.training import train

    real_save, saves = torch_io._atomic_save, []

    def fill_the_disk(checkpoint, path):
        saves.append(path)
        if len(saves) == 2:
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            Path(path).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(checkpoint, path)

    monkeypatch.setattr(torch_io, "_atomic_save", fill_the_disk)
    cfg = tiny_train_config("trainer.max_steps=8", "checkpoint.every_n_steps=2", "sample_prompts=null")
    with pytest.raises(OSError):
        train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2  # whole, from the first save

    monkeypatch.setattr(torch_io, "_atomic_save", real_save)
    recorder = RecordStart()
    with_callback(monkeypatch, recorder)
    assert train(cfg)["global_step"] == 8 and recorder.first_step == 2
    assert not last.parent.exists()  # the half-written .partial went with the checkpoints after the fit


# ============================================================================ 5, 6. reuse of data
def test_stage_hash_follows_the_content_of_its_data_files(tmp_path, cache_dir):
    from sdd.pipeline import StagePlanner, hydra_context

    harmful, advbench = tmp_path / "harmful.jsonl", tmp_path / "advbench.jsonl"
    shutil.copy(ROOT / "sdd" / "data" / "demo" / "harmful_instructions.jsonl", harmful)
    shutil.copy(ROOT / "sdd" / "data" / "demo" / "harmful_instructions.jsonl", advbench)

    def keys():
        common = f'stages.overrides.common=["corpus.harmful.path={harmful}","corpus.advbench.path={advbench}"]'
        point = compose_config(
            "pipeline",
            ["experiment=tiny_matrix", "point.defense=sdd", "point.attack=mft_advbench", common],
            log_dir=tmp_path / "logs",
            cache_dir=cache_dir,
            output_dir=tmp_path / "run",
        )
        with hydra_context():
            return {name: stage.key for name, stage in StagePlanner(point, tmp_path / "stages").plan().items()}

    first = keys()
    os.utime(harmful)  # touched, same content: same stages
    assert keys() == first
    harmful.write_text(harmful.read_text().replace("wifi", "WiFi"))  # edited in place
    edited = keys()
    assert edited["defense"] != first["defense"]  # SDD trains on corpus.harmful
    assert edited["evaluate_before_attack"] != first["evaluate_before_attack"]  # which also holds its eval prompts
    assert edited["attack"] != first["attack"]  # the attack reads the defended model, a new stage
    advbench.write_text(advbench.read_text().replace("wifi", "WiFi"))  # read by the attack only
    attack_data_edited = keys()
    assert attack_data_edited["attack"] != edited["attack"]
    assert {k: v for k, v in attack_data_edited.items() if k != "attack" and k != "evaluate_after_attack"} == {
        k: v for k, v in edited.items() if k != "attack" and k != "evaluate_after_attack"
    }  # the defense is kept


def test_a_truncated_or_edited_pair_cache_is_rebuilt(tmp_path, caplog):
    from test_sdd_pairs import CountingEmbedder, make_builder

    rows = [{"prompt": f"request {i}", "category": "c"} for i in range(60)]
    source = {
        "harmful": {
            "path": str(write_rows(tmp_path / "h.jsonl", rows)),
            "columns": {"instruction": "prompt", "category": "category"},
        },
        "answers": {
            "a": {
                "path": str(write_rows(tmp_path / "a.jsonl", [{"output": f"answer {i}"} for i in range(80)])),
                "columns": {"answer": "output"},
            }
        },
    }
    builder = make_builder(source, tmp_path, num_pairs=60)
    pairs, manifest = builder.build(CountingEmbedder())
    pairs_file = builder.output_dir() / "pairs.jsonl"
    original = pairs_file.read_text()

    pairs_file.write_text("".join(original.splitlines(keepends=True)[:44]))  # truncated after line 44
    embedder = CountingEmbedder()
    with caplog.at_level(logging.WARNING, logger="sdd.datamodules.sdd_pairs"):
        again, _ = builder.build(embedder)
    assert len(again) == 60 and embedder.calls  # rebuilt, not reused
    assert "44 pairs where the manifest says 60" in caplog.text
    assert pairs_file.read_text() == original

    pairs_file.write_text(original.replace("answer 1", "answer X", 1))  # same count, other content
    embedder = CountingEmbedder()
    assert builder.build(embedder)[0] == pairs and embedder.calls
    embedder = CountingEmbedder()
    assert builder.build(embedder)[0] == pairs and not embedder.calls  # intact: reused


# ============================================================================ 8. credentials
SECRET_URL = "http://user:s3cret@judge.example:8000/v1"


def test_scrubbing_removes_userinfo_from_every_url():
    from sdd.credentials import scrub_credentials

    value = {"a": [SECRET_URL, "https://tok@host/x?q=a@b", "plain text user:pw@host"], "n": 3}
    assert scrub_credentials(value) == {
        "a": ["http://***@judge.example:8000/v1", "https://***@host/x?q=a@b", "plain text user:pw@host"],
        "n": 3,
    }


def test_credentials_reach_no_file_of_an_evaluation_run(tmp_path, cache_dir, tiny_model):
    run = tmp_path / "run"
    outcome = run_entry(
        "evaluate.py",
        f"model={tiny_model}",
        f"eval.judges.rubric.base_url={SECRET_URL}",
        "eval.harmfulness.max_prompts_per_set=2",
        "eval.harmfulness.max_new_tokens=2",
        "eval.judges.relevance.enabled=false",
        f"hydra.run.dir={run}",
        env={"SDD_CACHE_DIR": str(cache_dir)},
    )
    assert outcome.status == 0, outcome.stderr[-2000:]
    written = {p.relative_to(run).as_posix(): p.read_text(errors="replace") for p in run.rglob("*") if p.is_file()}
    assert {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "results.json"} <= set(written)
    assert not [name for name, text in written.items() if "s3cret" in text]
    results = json.loads(written["results.json"])
    assert results["config"]["eval"]["judges"]["rubric"]["base_url"] == "http://***@judge.example:8000/v1"


def test_credentials_reach_no_file_of_a_training_run(tmp_path, cache_dir):
    run = tmp_path / "run"
    outcome = run_entry(
        "train.py",
        "experiment=quick_tiny",
        "trainer.max_steps=2",
        "data.num_examples=16",
        "checkpoint.every_n_steps=1",
        "checkpoint.keep_after_fit=true",
        "sample_max_new_tokens=2",
        f"sample_prompts=[{SECRET_URL}]",
        f"hydra.run.dir={run}",
        env={"SDD_CACHE_DIR": str(cache_dir)},
    )
    assert outcome.status == 0, outcome.stderr[-2000:]
    files = [p for p in run.rglob("*") if p.is_file()]
    assert {"config.yaml", "train_summary.json", "checkpoints/last.ckpt"} <= {
        p.relative_to(run).as_posix() for p in files
    }
    assert not [p for p in files if b"s3cret" in p.read_bytes()]


# ============================================================================ kill -9 during an attack
def test_a_pipeline_killed_during_its_attack_resumes_it_and_changes_nothing_else(tmp_path, cache_dir, monkeypatch):
    """kill -9 once the attack stage has a checkpoint; the re-run reuses the defense and the evaluation
    before the attack, resumes the attack from its checkpoint, and touches no other stage's files."""
    from sdd.pipeline import run_pipeline

    logs = tmp_path / "logs"
    overrides = [
        "experiment=tiny_matrix",
        "point.defense=safety_align",
        "point.attack=mft_advbench",
        'stages.overrides.defense=["data.num_examples=16","data.batch_size=8","data.max_length=96",'
        '"trainer.max_steps=2","sample_prompts=null"]',
        # long enough to be killed midway, a checkpoint at every step
        'stages.overrides.attack=["data.num_examples=16","data.batch_size=8","data.max_length=96",'
        '"trainer.max_steps=40","trainer.max_epochs=-1","checkpoint.every_n_steps=1","sample_prompts=null"]',
        'stages.overrides.evaluate=["eval.harmfulness.max_prompts_per_set=2","eval.harmfulness.max_new_tokens=2",'
        f'"eval.judges.relevance.enabled=false","eval.capability.enabled=false","eval.judges.rubric.base_url={SECRET_URL}"]',
    ]
    env = {**os.environ, "SDD_CACHE_DIR": str(cache_dir), "WANDB_MODE": "disabled"}
    job = subprocess.Popen(
        [sys.executable, "pipeline.py", *overrides, f"paths.log_dir={logs}", f"hydra.run.dir={tmp_path / 'first'}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 600
    while not (checkpoints := list(logs.glob("stages/attack/*/checkpoints/last.ckpt"))):
        assert job.poll() is None, f"the pipeline ended before its attack checkpointed: {job.stderr.read()[-3000:]}"
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    stages = logs / "stages"
    attack_dir = checkpoints[0].parents[1]
    assert not (attack_dir / "stage.json").exists() and not (tmp_path / "first" / "results.json").exists()
    killed_at = torch.load(attack_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 1 <= killed_at < 40

    def other_stages(path: Path) -> bool:  # the resumed stage's folder, and the locks
        return attack_dir in path.parents or path.suffix == ".lock"

    before = tree_state(stages, skip=other_stages)
    assert {p.split("/")[0] for p in before} == {"defense", "evaluate"}

    cfg = compose_config("pipeline", [*overrides], log_dir=logs, cache_dir=cache_dir, output_dir=tmp_path / "again")
    recorder = RecordStart()
    with_callback(monkeypatch, recorder)  # sees the only training of the re-run: the attack's
    record = run_pipeline(cfg)
    assert record["reused_stages"] == ["defense", "evaluate_before_attack"]
    assert record["stages"]["attack"]["global_step"] == 40
    assert recorder.first_step == killed_at  # resumed from the checkpoint the kill left
    after = tree_state(stages, skip=other_stages)
    assert {k: v for k, v in after.items() if k in before} == before  # no other stage's file changed
    assert set(after) - set(before) <= {p for p in after if p.startswith("evaluate/after_attack")}
    for path in [*stages.rglob("*.json"), tmp_path / "again" / "results.json", *(tmp_path / "first").rglob("*.yaml")]:
        assert "s3cret" not in path.read_text(), path
