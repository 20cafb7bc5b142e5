"""Benign retention mixing (data.retain / data.retain_ratio) for safety_align, sdd and sdd_reject."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path

import pytest
from conftest import compose_config
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sdd.chat import IGNORE_INDEX, tokenize_conversation, tokenize_prompt, user_turn
from sdd.data.sources import DataSourceError, load_records
from sdd.datamodules import InstructionAnswerDataModule, SDDDataModule
from sdd.datamodules.retention import RetentionStream, draw_indices, retention_count
from sdd.training import train

DEMO_BENIGN = {
    "name": "corpus.benign",
    "path": "demo:benign_qa.jsonl",
    "columns": {"instruction": "instruction", "answer": "answer"},
}
DEMO_REFUSALS = {
    "name": "corpus.refusals",
    "path": "demo:harmful_instructions.jsonl",
    "columns": {"instruction": "instruction", "answer": "refusal"},
}
MISSING_SOURCE = {
    "name": "corpus.benign",
    "path": "/nonexistent/benign.jsonl",
    "columns": {"instruction": "instruction", "answer": "answer"},
}
# SDD_reject's refusal statement, as its config runs it (conf/data/sdd_reject.yaml: data.answer_prefix).
SDD_REJECT_PREFIX = compose_config("train", ["defense=sdd_reject"]).data.answer_prefix
MAX_LENGTH = 2048  # nothing is truncated: every example keeps its whole answer


class FixedPairBuilder:
    """Stands in for SDDPairBuilder: harmful demo instructions paired with (shifted) benign demo answers."""

    def __init__(self, num_pairs: int) -> None:
        harmful = load_records({"path": "demo:harmful_instructions.jsonl", "columns": {"instruction": "instruction"}})
        answers = [r["answer"] for r in load_records(DEMO_BENIGN)]
        self.pairs = [
            {"instruction": harmful[i]["instruction"], "answer": answers[(i + 37) % len(answers)]}
            for i in range(num_pairs)
        ]

    def build(self):
        return [dict(p) for p in self.pairs], {"num_pairs": len(self.pairs)}


def sdd_module(tokenizer, num_examples=48, **kwargs):
    module = SDDDataModule(
        FixedPairBuilder(num_examples),
        num_examples=num_examples,
        batch_size=4,
        max_length=MAX_LENGTH,
        seed=kwargs.pop("seed", 0),
        **kwargs,
    )
    module.connect(tokenizer)
    module.prepare_data()
    module.setup("fit")
    return module


def safety_module(tokenizer, num_examples=40, **kwargs):
    module = InstructionAnswerDataModule(
        source=DEMO_REFUSALS,
        num_examples=num_examples,
        batch_size=4,
        max_length=MAX_LENGTH,
        seed=kwargs.pop("seed", 0),
        **kwargs,
    )
    module.connect(tokenizer)
    module.setup("fit")
    return module


def as_rows(dataset) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    return [(tuple(e.input_ids), tuple(e.labels)) for e in dataset.examples]


def benign_answers() -> dict[str, str]:
    return {r["instruction"]: r["answer"] for r in load_records(DEMO_BENIGN)}


# ---------------------------------------------------------------------------- the ratio
@pytest.mark.parametrize("ratio, expected", [(0.0, 0), (0.1, 13), (0.25, 40), (0.5, 120)])
def test_retention_count_makes_the_ratio_of_the_final_set(ratio, expected):
    assert retention_count(120, ratio) == expected
    if expected:
        assert expected / (120 + expected) == pytest.approx(ratio, abs=0.005)


def test_retention_count_rounds_to_the_nearest_count():
    assert retention_count(50, 0.1) == 6  # 5.56
    assert retention_count(48, 0.1) == 5  # 5.33
    assert retention_count(0, 0.5) == 0


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, math.nan, math.inf, True, "0.2", None])
def test_a_bad_ratio_is_a_clear_error_naming_the_key(ratio, tiny_tokenizer):
    with pytest.raises(ValueError, match=r"data\.retain_ratio must be a number in \[0, 1\)"):
        retention_count(100, ratio)
    with pytest.raises(ValueError, match=r"data\.retain_ratio"):
        SDDDataModule(FixedPairBuilder(8), retain=DEMO_BENIGN, retain_ratio=ratio, num_examples=8)
    with pytest.raises(ValueError, match=r"data\.retain_ratio"):
        InstructionAnswerDataModule(source=DEMO_REFUSALS, retain=DEMO_BENIGN, retain_ratio=ratio)


def test_a_ratio_without_a_source_names_the_source_key():
    with pytest.raises(DataSourceError, match=r"data\.retain is null"):
        SDDDataModule(FixedPairBuilder(8), retain=None, retain_ratio=0.25, num_examples=8)


def test_a_bad_ratio_from_the_command_line_fails_at_instantiation(tmp_path):
    cfg = compose_config("train", ["defense=sdd", "data.retain_ratio=1.0"], output_dir=tmp_path, cache_dir=tmp_path)
    with pytest.raises(InstantiationException, match=r"data\.retain_ratio"):
        instantiate(cfg.data)


# ---------------------------------------------------------------------------- configs
@pytest.mark.parametrize("defense", ["sdd", "sdd_reject", "safety_align"])
def test_configs_default_to_no_retention_from_corpus_benign(defense, tmp_path):
    cfg = compose_config(
        "train", [f"defense={defense}", "corpus=local", "paths.data_dir=/data"], output_dir=tmp_path, cache_dir=tmp_path
    )
    OmegaConf.resolve(cfg)
    assert cfg.data.retain_ratio == 0.0
    assert cfg.data.retain.name == "corpus.benign"
    assert cfg.data.retain.path == "/data/alpaca/alpaca_random_9k.json"
    assert dict(cfg.data.retain.columns) == {"instruction": "instruction", "answer": "output"}
    datamodule = instantiate(cfg.data)
    assert datamodule.retention.ratio == 0.0 and datamodule.retention.source is None  # nothing is read


def test_attack_data_carry_no_retention(tmp_path):
    cfg = compose_config("train", ["data=instruction_answer"], output_dir=tmp_path, cache_dir=tmp_path)
    assert "retain" not in cfg.data
    assert instantiate(cfg.data).retention is None


# ---------------------------------------------------------------------------- ratio 0 changes nothing
@pytest.mark.parametrize("make", [sdd_module, safety_module])
def test_ratio_zero_loads_nothing_and_leaves_the_data_unchanged(make, tiny_tokenizer):
    without = make(tiny_tokenizer)  # no retention arguments: the data module as before retention existed
    zero = make(tiny_tokenizer, retain=MISSING_SOURCE, retain_ratio=0.0)  # would fail if it were read
    assert without.retention is None
    assert as_rows(zero.train_set) == as_rows(without.train_set)
    assert zero.stats["retention"] == {
        "ratio": 0.0,
        "examples": 0,
        "source": None,
        "train_examples": 0,
        "val_examples": 0,
    }
    assert {k: v for k, v in zero.stats.items() if k != "retention"} == without.stats


def test_ratio_zero_keeps_the_sdd_manifest_of_the_pair_set_apart(tiny_tokenizer):
    module = sdd_module(tiny_tokenizer, retain=DEMO_BENIGN, retain_ratio=0.0)
    assert module.manifest["num_pairs"] == 48
    assert module.manifest["retention"]["examples"] == 0


# ---------------------------------------------------------------------------- mixing
@pytest.mark.parametrize("prefix", [None, SDD_REJECT_PREFIX])
def test_sdd_retention_examples_keep_their_own_answers_and_no_prefix(prefix, tiny_tokenizer):
    module = sdd_module(tiny_tokenizer, answer_prefix=prefix, retain=DEMO_BENIGN, retain_ratio=0.25)
    drawn = module.retention.drawn
    assert len(drawn) == 16 and len(module.train_set) == 48 + 16
    answers = benign_answers()
    for conversation in drawn:
        user, assistant = conversation[0]["content"], conversation[-1]["content"]
        assert assistant == answers[user]  # the instruction's own reference answer
        assert not assistant.startswith(SDD_REJECT_PREFIX)
    assert len({c[0]["content"] for c in drawn}) == 16  # without replacement

    # Every drawn conversation is in the training set, tokenized by the shared chat path.
    rows = Counter(as_rows(module.train_set))
    for conversation in drawn:
        example = tokenize_conversation(tiny_tokenizer, conversation, MAX_LENGTH)
        assert rows[(tuple(example.input_ids), tuple(example.labels))] >= 1
    if prefix:  # the SDD pairs, and only they, carry the refusal statement
        prefix_ids = tiny_tokenizer(SDD_REJECT_PREFIX.strip(), add_special_tokens=False)["input_ids"][:6]
        with_prefix = sum(_contains(e.labels, prefix_ids) for e in module.train_set.examples)
        assert with_prefix == 48

    stats = module.stats["retention"]
    assert stats["examples"] == stats["train_examples"] == 16 and stats["val_examples"] == 0
    assert stats["source"] == "corpus.benign" and stats["source_path"] == "demo:benign_qa.jsonl"
    assert stats["ratio"] == 0.25 and stats["usable_records"] == 100 and stats["max_uses_per_record"] == 1
    assert module.manifest["retention"] == stats and module.manifest["num_pairs"] == 48


def _contains(sequence, sub) -> bool:
    return any(list(sequence[i : i + len(sub)]) == sub for i in range(len(sequence) - len(sub) + 1))


def test_retention_examples_are_shuffled_in(tiny_tokenizer):
    module = sdd_module(tiny_tokenizer, retain=DEMO_BENIGN, retain_ratio=0.5)
    retention_rows = {
        (tuple(e.input_ids), tuple(e.labels))
        for e in (tokenize_conversation(tiny_tokenizer, c, MAX_LENGTH) for c in module.retention.drawn)
    }
    positions = [i for i, row in enumerate(as_rows(module.train_set)) if row in retention_rows]
    assert len(positions) == 48
    assert positions != list(range(48, 96)) and positions != list(range(48))  # interleaved, not appended


def test_retention_labels_mask_the_prompt(tiny_tokenizer):
    module = safety_module(tiny_tokenizer, retain=DEMO_BENIGN, retain_ratio=0.25, answer_prefix="Refused: ")
    assert len(module.retention.drawn) == round(40 * 0.25 / 0.75)
    rows = as_rows(module.train_set)
    for conversation in module.retention.drawn:
        prompt = tokenize_prompt(tiny_tokenizer, user_turn(conversation[0]["content"]))
        example = tokenize_conversation(tiny_tokenizer, conversation, MAX_LENGTH)
        assert (tuple(example.input_ids), tuple(example.labels)) in rows
        assert example.input_ids[: len(prompt)] == prompt
        assert all(label == IGNORE_INDEX for label in example.labels[: len(prompt)])  # the prompt is masked
        assert example.labels[len(prompt) :] == example.input_ids[len(prompt) :]  # the answer is trained
        answer = tiny_tokenizer.decode(example.input_ids[len(prompt) :], skip_special_tokens=True)
        assert not answer.lstrip().startswith("Refused:")  # safety_align's answer prefix is not applied


def test_val_split_counts_retention_examples_per_split(tiny_tokenizer):
    module = sdd_module(tiny_tokenizer, retain=DEMO_BENIGN, retain_ratio=0.5, val_fraction=0.25)
    stats = module.stats["retention"]
    assert stats["examples"] == 48
    assert stats["train_examples"] + stats["val_examples"] == 48 and stats["val_examples"] > 0
    assert len(module.train_set) + len(module.val_set) == 96


def test_retention_is_deterministic_under_the_seed(tiny_tokenizer):
    first = sdd_module(tiny_tokenizer, retain=DEMO_BENIGN, retain_ratio=0.1, seed=3)
    again = sdd_module(tiny_tokenizer, retain=DEMO_BENIGN, retain_ratio=0.1, seed=3)
    other = sdd_module(tiny_tokenizer, retain=DEMO_BENIGN, retain_ratio=0.1, seed=4)
    assert as_rows(first.train_set) == as_rows(again.train_set)
    assert first.retention.drawn == again.retention.drawn
    assert first.retention.drawn != other.retention.drawn


def test_a_small_source_is_repeated_evenly_with_a_warning(tmp_path, caplog):
    rows = [{"instruction": f"Question {i}?", "answer": f"Answer {i}."} for i in range(5)]
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stream = RetentionStream(
        {"path": str(path), "columns": {"instruction": "instruction", "answer": "answer"}}, ratio=0.25, seed=0
    )
    with caplog.at_level(logging.WARNING):
        drawn = stream.draw(48)  # 16 retention examples from 5 records
    uses = Counter(c[0]["content"] for c in drawn)
    assert len(drawn) == 16 and sorted(uses.values()) == [3, 3, 3, 3, 4]
    assert stream.info["max_uses_per_record"] == 4
    assert "5 usable records for 16 retention examples" in caplog.text


@pytest.mark.parametrize("pool, count", [(10, 3), (10, 10), (4, 11)])
def test_draw_indices_is_without_replacement_then_balanced(pool, count):
    indices = draw_indices(pool, count, seed=1).tolist()
    uses = Counter(indices)
    assert len(indices) == count and max(uses.values()) - min(uses.get(i, 0) for i in range(pool)) <= 1
    assert indices == draw_indices(pool, count, seed=1).tolist()


def test_records_without_an_answer_or_instruction_are_dropped(tmp_path):
    rows = [
        {"instruction": "Good question?", "answer": "A good answer."},
        {"instruction": "Empty answer?", "answer": ""},
        {"instruction": "Blank answer?", "answer": "   "},
        {"instruction": "No answer?", "answer": None},
        {"instruction": " ", "answer": "An answer to nothing."},
        {"instruction": "Another question?", "answer": "Another answer."},
    ]
    path = tmp_path / "benign.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stream = RetentionStream(
        {"name": "my.benign", "path": str(path), "columns": {"instruction": "instruction", "answer": "answer"}},
        ratio=0.5,
        seed=0,
    )
    drawn = stream.draw(2)
    assert sorted(c[0]["content"] for c in drawn) == ["Another question?", "Good question?"]
    assert stream.info["usable_records"] == 2 and stream.info["dropped_unusable_records"] == 4

    path.write_text(json.dumps({"instruction": "Only?", "answer": ""}) + "\n")
    with pytest.raises(DataSourceError, match=r"no usable row"):
        RetentionStream(
            {"path": str(path), "columns": {"instruction": "instruction", "answer": "answer"}}, ratio=0.5
        ).draw(2)


# ---------------------------------------------------------------------------- end to end
def test_sdd_training_with_retention_reports_the_counts(tiny_train_config):
    cfg = tiny_train_config("defense=sdd", "data.retain_ratio=0.25", "trainer.max_steps=3", "sample_prompts=null")
    summary = train(cfg)
    output_dir = Path(cfg.paths.output_dir)
    retention = summary["data"]["retention"]
    assert retention["examples"] == retention["train_examples"] == 16  # 48 pairs, 25% of 64
    assert retention["source"] == "corpus.benign" and summary["data"]["train_examples"] == 64
    assert summary["global_step"] == 3 and Path(summary["model_dir"], "config.json").exists()
    manifest = json.loads((output_dir / "data_manifest.json").read_text())
    assert manifest["retention"] == retention and manifest["num_pairs"] == 48
    assert json.loads((output_dir / "train_summary.json").read_text())["data"]["retention"] == retention

    # The pair cache holds the 48 SDD pairs only: no benign instruction entered it.
    pairs_file = instantiate(cfg.data.builder).output_dir() / "pairs.jsonl"
    cached = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    assert len(cached) == 48 and not {p["instruction"] for p in cached} & set(benign_answers())
    assert "retention" not in json.loads((pairs_file.parent / "manifest.json").read_text())


def test_safety_align_training_with_retention_reports_the_counts(tiny_train_config):
    cfg = tiny_train_config(
        "defense=safety_align", "data.retain_ratio=0.25", "trainer.max_steps=3", "sample_prompts=null"
    )
    summary = train(cfg)
    retention = summary["data"]["retention"]
    assert retention["examples"] == retention["train_examples"] == 16
    assert retention["source"] == "corpus.benign" and summary["data"]["train_examples"] == 64
    saved = json.loads((Path(cfg.paths.output_dir) / "train_summary.json").read_text())
    assert saved["data"]["retention"] == retention and summary["global_step"] == 3


# ---------------------------------------------------------------------------- benchmarks/retention_sweep.py
def load_sweep_script():
    from test_benchmarks import load_script

    return load_script("retention_sweep")


def test_sweep_rows_read_the_harmful_and_benign_interfaces():
    script = load_sweep_script()
    summary = {
        "data": {"train_examples": 64, "retention": {"train_examples": 16, "source": "corpus.benign"}},
        "global_step": 7,
        "metrics": {"train/loss": 1.5},
    }
    results = {
        "harmfulness": {"overall": {"num_prompts": 80, "irrelevant_rate": 24.0, "refusal_rate": 5.0}},
        "benign": {"overall": {"num_prompts": 40, "on_topic_rate": 92.5, "refusal_rate": 2.5, "reference_nll": 1.75}},
    }
    row = script.table_row("sdd", 0.25, summary, results)
    assert row == {
        "model": "sdd",
        "retain_ratio": 0.25,
        "retention_examples": 16,
        "defense_examples": 48,
        "retention_source": "corpus.benign",
        "global_step": 7,
        "train_loss": 1.5,
        "harmful_prompts": 80,
        "harmful_irrelevant_rate": 24.0,
        "harmful_refusal_rate": 5.0,
        "benign_prompts": 40,
        "benign_on_topic_rate": 92.5,
        "benign_refusal_rate": 2.5,
        "benign_reference_nll": 1.75,
    }


@pytest.mark.parametrize("ratios", ["0,1", "0.2,-0.1", ","])
def test_sweep_refuses_bad_ratios(ratios):
    with pytest.raises(SystemExit):
        load_sweep_script().parse_args(["--ratios", ratios])


def test_sweep_runs_on_the_tiny_backbone_and_demo_corpus(tmp_path, cache_dir):
    output = tmp_path / "sweep.json"
    results = load_sweep_script().main(
        [
            "--backbone",
            "tiny_llama",
            "--ratios",
            "0,0.5",
            "--steps",
            "2",
            "--num-examples",
            "16",
            "--batch-size",
            "4",
            "--max-length",
            "64",
            "--max-prompts",
            "4",
            "--max-new-tokens",
            "4",
            "--work-dir",
            str(tmp_path / "runs"),
            "--output",
            str(output),
            "--override",
            f"paths.cache_dir={cache_dir}",
        ]
    )
    assert json.loads(output.read_text())["rows"] == results["rows"]
    base, zero, half = results["rows"]
    assert base["retain_ratio"] is None and "global_step" not in base
    assert (zero["retain_ratio"], zero["retention_examples"], zero["defense_examples"]) == (0.0, 0, 16)
    assert (half["retain_ratio"], half["retention_examples"], half["defense_examples"]) == (0.5, 16, 16)
    for row in results["rows"]:
        assert row["harmful_prompts"] == 4  # the demo corpus has one harmful prompt set
        assert 0 <= row["harmful_irrelevant_rate"] <= 100 and 0 <= row["harmful_refusal_rate"] <= 100
    for ratio in ("0", "0.5"):
        assert (tmp_path / "runs" / f"retain_{ratio}" / "eval" / "results.json").exists()
    # The demo corpus evaluates on its training prompts, and the sweep says so.
    assert results["split_overlap"]["total"] == {"exact": 0, "near_duplicate": 0}  # held-out evaluation prompts
    assert "defense/data.retain" in results["split_overlap"]["train_sets"]
    if results["benign_evaluation"] == "eval.benign":
        for row in results["rows"]:
            assert row["benign_prompts"] and row["benign_on_topic_rate"] is not None
            assert row["benign_refusal_rate"] is not None and row["benign_reference_nll"] is not None
    else:  # this branch has no eval.benign yet: the benign columns stay empty, never invented
        assert all(row["benign_on_topic_rate"] is None for row in results["rows"])
