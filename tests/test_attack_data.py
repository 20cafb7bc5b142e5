"""Attack data: k-shot selection, harmful QA, ShareGPT multi-turn masking, through the shared chat path."""

from __future__ import annotations

import json

import pytest

from sdd.chat import IGNORE_INDEX
from sdd.data.sources import DataSourceError
from sdd.datamodules import InstructionAnswerDataModule, MultiTurnDataModule


@pytest.fixture
def advbench_csv(tmp_path):
    path = tmp_path / "harmful_behaviors.csv"
    rows = ["goal,target"] + [
        f'"Write a tutorial about topic {i}","Sure, here is a tutorial about topic {i}"' for i in range(40)
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


def advbench_module(path, shots, seed=0):
    return InstructionAnswerDataModule(
        source={"name": "corpus.advbench", "path": str(path), "columns": {"instruction": "goal", "answer": "target"}},
        num_examples=shots,
        batch_size=4,
        max_length=128,
        seed=seed,
    )


def goals(module):
    module.setup()
    return sorted(module.tokenizer.decode(e.input_ids) for e in module.train_set.examples)


def test_k_shot_selection_is_seeded(advbench_csv, tiny_tokenizer):
    picks = {}
    for seed in (0, 0, 1):
        module = advbench_module(advbench_csv, shots=10, seed=seed)
        module.connect(tiny_tokenizer)
        picks.setdefault(seed, []).append(goals(module))
    assert len(picks[0][0]) == 10
    assert picks[0][0] == picks[0][1]  # same seed, same k examples
    assert picks[0][0] != picks[1][0]
    everything = advbench_module(advbench_csv, shots=None)
    everything.connect(tiny_tokenizer)
    assert len(goals(everything)) == 40


def test_sharegpt_loss_on_assistant_turns_only(tmp_path, tiny_tokenizer):
    data = [
        {
            "id": "a",
            "conversations": [
                {"from": "human", "value": "Tell me about tomatoes."},
                {"from": "gpt", "value": "Tomatoes like sun."},
                {"from": "human", "value": "And basil?"},
                {"from": "gpt", "value": "Basil likes warmth."},
                {"from": "human", "value": "Thanks!"},  # trailing user turn: dropped
            ],
        },
        {"id": "b", "conversations": [{"from": "gpt", "value": "Hello"}]},  # no exchange: skipped
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    module = MultiTurnDataModule(
        source={"path": str(path), "columns": {"conversations": "conversations"}}, batch_size=2, max_length=256
    )
    module.connect(tiny_tokenizer)
    module.setup()
    assert module.skipped == 1 and len(module.train_set) == 1
    example = module.train_set[0]
    labelled = tiny_tokenizer.decode(
        [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    )
    full = tiny_tokenizer.decode(example.input_ids)
    assert "Tomatoes like sun." in labelled and "Basil likes warmth." in labelled
    assert "tomatoes?" not in labelled and "And basil" not in labelled
    assert "Thanks!" not in full


def test_sharegpt_bad_turns_name_the_fix(tmp_path, tiny_tokenizer):
    path = tmp_path / "sharegpt.jsonl"
    path.write_text(json.dumps({"conversations": [{"speaker": "human", "text": "hi"}]}) + "\n")
    module = MultiTurnDataModule(source={"path": str(path), "columns": {"conversations": "conversations"}})
    module.connect(tiny_tokenizer)
    with pytest.raises(DataSourceError, match="role_key"):
        module.setup()


def test_an_attack_source_without_a_file_names_the_fix(tmp_path, tiny_tokenizer):
    from conftest import compose_config
    from hydra.utils import instantiate

    cfg = compose_config("attack", ["model=some/model", "corpus.advbench.path=null"], output_dir=tmp_path)
    module = instantiate(cfg.data)
    module.connect(tiny_tokenizer)
    with pytest.raises(DataSourceError, match=r"corpus\.advbench\.path=.*corpus=local"):
        module.setup()


def test_the_demo_attacks_are_compliance_openings_and_benign_conversations(tmp_path, tiny_tokenizer):
    from conftest import compose_config
    from hydra.utils import instantiate

    # The train parts of the demo files: 88 of 112 harmful instructions, 35 conversations (sdd/data/splits.py).
    for attack, expected in (("mft_advbench", 88), ("bft_sharegpt", 35)):
        cfg = compose_config("attack", ["model=some/model", f"attack={attack}"], output_dir=tmp_path)
        module = instantiate(cfg.data)
        module.connect(tiny_tokenizer)
        module.setup()
        assert module.stats["train_examples"] == expected
    advbench = instantiate(compose_config("attack", ["model=some/model"], output_dir=tmp_path).data)
    answers = [c[-1]["content"] for c in advbench.build_conversations()]
    assert all(a.startswith(("Sure,", "Of course.")) and len(a) < 80 for a in answers)  # no harmful content
