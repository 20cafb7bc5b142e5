"""Clean splits by construction: a deterministic, disjoint, covering partition of shared sources, the same
prompt in the same part through every file and column, and the corpora's train / held-out assignments."""

from __future__ import annotations

import json

import pytest
from conftest import compose_config

from sdd.data.sources import load_records
from sdd.data.splits import PartitionError, normalize_text, part_of, partition_records

PROMPTS = [f"Explain step {i} of procedure number {i * 7 % 13} in detail" for i in range(400)]


def split(records, key="instruction", fraction=0.3, seed=0):
    parts = {
        part: partition_records(records, {"part": part, "key": key, "heldout_fraction": fraction, "seed": seed}, "src")
        for part in ("train", "heldout")
    }
    return parts["train"], parts["heldout"]


def test_the_partition_is_deterministic_disjoint_and_covers_every_record():
    records = [{"instruction": p, "row": i} for i, p in enumerate(PROMPTS)]
    train, heldout = split(records)
    assert split(records) == (train, heldout)  # deterministic
    rows = lambda part: {r["row"] for r in part}  # noqa: E731
    assert rows(train).isdisjoint(rows(heldout)) and rows(train) | rows(heldout) == set(range(len(PROMPTS)))
    assert 0.22 < len(heldout) / len(records) < 0.38  # about heldout_fraction
    assert [r["row"] for r in train] == sorted(rows(train))  # file order kept
    assert split(records, seed=1) != (train, heldout)  # the seed is the salt
    shuffled = list(reversed(records))  # the part depends on the text only, not on the row
    assert {r["row"] for r in split(shuffled)[1]} == rows(heldout)


def test_the_same_prompt_goes_to_the_same_part_through_any_file_and_column(tmp_path):
    csv = tmp_path / "harmful_behaviors.csv"
    csv.write_text("goal,target\n" + "".join(f'"{p}.","Sure, here is {i}"\n' for i, p in enumerate(PROMPTS)))
    jsonl = tmp_path / "eval.jsonl"  # the same prompts, other case and punctuation, another column name
    jsonl.write_text("".join(json.dumps({"question": "  " + p.upper() + "?"}) + "\n" for p in PROMPTS))
    attack = load_records(
        {
            "name": "corpus.advbench",
            "path": str(csv),
            "columns": {"instruction": "goal", "answer": "target"},
            "partition": {"part": "train", "key": "instruction"},
        }
    )
    evaluation = load_records(
        {
            "name": "corpus.eval_prompts.x",
            "path": str(jsonl),
            "columns": {"prompt": "question"},
            "partition": {"part": "heldout", "key": "prompt"},
        }
    )
    trained = {normalize_text(r["instruction"]) for r in attack}
    evaluated = {normalize_text(r["prompt"]) for r in evaluation}
    assert trained.isdisjoint(evaluated) and trained | evaluated == {normalize_text(p) for p in PROMPTS}
    assert (
        normalize_text("Write a script, please!") == normalize_text("write a  SCRIPT please") == "write a script please"
    )


def test_a_bad_partition_option_names_the_fix(tmp_path):
    records = [{"instruction": p} for p in PROMPTS[:10]]
    with pytest.raises(PartitionError, match=r"src\.partition\.part='test'.*\['train', 'heldout'\]"):
        partition_records(records, {"part": "test"}, "src")
    with pytest.raises(PartitionError, match=r"src\.partition\.key='prompt' is not a column.*src\.columns\.prompt="):
        partition_records(records, {"part": "train", "key": "prompt"}, "src")
    with pytest.raises(PartitionError, match=r"heldout_fraction=1\.5"):
        partition_records(records, {"part": "train", "heldout_fraction": 1.5}, "src")
    with pytest.raises(PartitionError, match="unknown key"):
        partition_records(records, {"part": "train", "fraction": 0.1}, "src")
    only_heldout = [r for r in records if part_of(r["instruction"], 0.3) == "heldout"][:1]
    with pytest.raises(PartitionError, match="train part of its 1 records is empty"):
        partition_records(only_heldout, {"part": "train"}, "src")


def test_the_demo_corpus_trains_and_evaluates_on_disjoint_parts(tmp_path):
    corpus = compose_config("eval", ["model=x"], output_dir=tmp_path).corpus
    text = {"instruction": "instruction", "prompt": "prompt"}
    train = {name: corpus[name] for name in ("harmful", "refusals", "benign", "safety_pairs", "advbench", "harmful_qa")}
    train["answers.demo_benign"] = corpus.answers.demo_benign
    evaluation = {
        "eval_prompts.demo_harmful": corpus.eval_prompts.demo_harmful,
        "benign_eval.demo_benign": corpus.benign_eval.demo_benign,
    }
    loaded = {}
    for name, source in {**train, **evaluation}.items():
        assert source.partition.part == ("heldout" if name in evaluation else "train"), name
        assert (source.partition.heldout_fraction, source.partition.seed) == (0.3, 0)
        records = load_records(source)
        column = next(c for c in text if c in records[0])
        loaded[name] = {normalize_text(r[column]) for r in records}
    assert len(loaded["harmful"]) == 88 and len(loaded["eval_prompts.demo_harmful"]) == 24
    assert len(loaded["benign"]) == 70 and len(loaded["benign_eval.demo_benign"]) == 30
    for train_name in train:
        for eval_name in evaluation:
            assert loaded[train_name].isdisjoint(loaded[eval_name]), (train_name, eval_name)
    # The demo's benign fine-tuning conversations are built from the train part only.
    conversations = load_records(corpus.sharegpt)
    users = {normalize_text(t["value"]) for r in conversations for t in r["conversations"] if t["from"] == "human"}
    assert users <= loaded["benign"]


@pytest.mark.parametrize("corpus", ["local", "hub"])
def test_the_real_corpora_split_advbench_and_alpaca(corpus, tmp_path):
    cfg = compose_config("eval", ["model=x", f"corpus={corpus}", "paths.data_dir=/data"], output_dir=tmp_path).corpus
    expected = {
        "advbench": ("train", "instruction"),
        "eval_prompts.advbench": ("heldout", "prompt"),
        "benign": ("train", "instruction"),
        "answers.alpaca": ("train", "instruction"),
        "benign_eval.alpaca": ("heldout", "prompt"),
    }
    for name, (part, key) in expected.items():
        node = cfg
        for piece in name.split("."):
            node = node[piece]
        assert dict(node.partition) == {"part": part, "key": key, "heldout_fraction": 0.3, "seed": 0}, name
        assert key in node.columns
    assert dict(cfg.benign_eval.alpaca.columns) == {"prompt": "instruction", "input": "input", "reference": "output"}
    assert cfg.benign_eval.alpaca.limit == 500
    # Columns read from one file agree: the attack's goal is the evaluation's goal.
    if corpus == "local":
        assert cfg.advbench.columns.instruction == cfg.eval_prompts.advbench.columns.prompt == "goal"
        assert cfg.advbench.path == cfg.eval_prompts.advbench.path
