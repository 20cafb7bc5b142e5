"""Capability evaluation through lm-evaluation-harness, offline, with a tiny in-process Llama.

The key check: the harness's accuracy equals an accuracy computed here by hand with the same model,
scoring each choice by its log-likelihood after the prompt written out as the task YAML formats it.
A second model with a zeroed output layer (every token equally likely) has accuracies that follow
from the data alone, which pins the plumbing down independently of the hand computation.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import copy
import csv
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

from sdd.evaluation.capability import KNOWN_TASKS, evaluate_capability, local_task_config  # noqa: E402

LETTERS = ["A", "B", "C", "D"]

MMLU = [  # (subject, question, choices)
    (
        "high_school_biology",
        "What is the powerhouse of the cell?",
        ["Nucleus", "Mitochondria", "Ribosome", "Golgi apparatus"],
    ),
    ("elementary_mathematics", "What is 2 + 3?", ["4", "5", "6", "7"]),
    ("astronomy", "Which planet is known as the Red Planet?", ["Venus", "Mars", "Jupiter", "Saturn"]),
    ("high_school_chemistry", "What is the chemical formula of water?", ["H2O", "CO2", "O2", "NaCl"]),
    (
        "college_biology",
        "Which gas do plants take in for photosynthesis?",
        ["Oxygen", "Carbon dioxide", "Nitrogen", "Helium"],
    ),
    ("world_religions", "  How many days are there in a week?  ", ["Five", "Six", "Seven", "Eight"]),
]

# Each question has exactly one very short choice ("short" = its index); see test_rigged_uniform_model.
OPENBOOKQA = [  # (question_stem, choices, index of the short choice)
    (
        "The sun is a",
        [
            "star",
            "planet that circles the moon every single day",
            "comet of frozen gas and dust",
            "small moon of a giant planet",
        ],
        0,
    ),
    (
        "Ice is water that is",
        ["boiling over a very hot flame", "turning into steam and vapor", "cold", "mixed with salt and sugar"],
        2,
    ),
    (
        "A magnet will attract",
        ["a wooden spoon and a paper cup", "a rubber band and plastic toys", "glass marbles and cotton wool", "iron"],
        3,
    ),
    (
        "Plants need sunlight to",
        [
            "grow",
            "sleep at night in the dark forest",
            "move their roots across the garden",
            "make loud noises when the wind blows",
        ],
        0,
    ),
    (
        "An example of a mammal is a",
        [
            "shark swimming in the deep ocean",
            "dog",
            "frog jumping between the lily pads",
            "snake hiding under a warm rock",
        ],
        1,
    ),
]


# --------------------------------------------------------------------------- prompts, by hand


def mmlu_prompt(subject: str, question: str, choices: list[str]) -> str:
    """sdd_mmlu_local.yaml: description (from subject) + doc_to_text; choices are the letters."""
    description = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return (
        description + f"{question.strip()}\nA. {choices[0]}\nB. {choices[1]}\nC. {choices[2]}\nD. {choices[3]}\nAnswer:"
    )


def tokenizer_texts() -> list[str]:
    texts = []
    for subject, question, choices in MMLU:
        texts += [mmlu_prompt(subject, question, choices) + f" {letter}" for letter in LETTERS]
    for stem, choices, _ in OPENBOOKQA:
        texts += [f"{stem} {choice}" for choice in choices]
    return texts * 3


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matrices: OpenMP threads only add contention (several x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer trained on this file's texts (no BOS is added on encode)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(tokenizer_texts(), trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
    )


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    # A wide init (default 0.02) makes the random model's answer depend on the whole prompt, not
    # mostly on its last token, so a prompt formatted differently would change its predictions.
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        initializer_range=0.5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def uniform_model(model):
    """Same architecture, output layer zeroed: every next token has probability 1/V."""
    rigged = copy.deepcopy(model)
    with torch.no_grad():
        rigged.lm_head.weight.zero_()
    return rigged


@torch.no_grad()
def choice_logliks(model, tokenizer, prompt: str, choices: list[str]) -> list[float]:
    """log p(" " + choice | prompt) for each choice (target_delimiter " "), one forward per choice."""
    context = tokenizer.encode(prompt)
    lls = []
    for choice in choices:
        full = tokenizer.encode(prompt + " " + choice)
        assert full[: len(context)] == context  # the pre-tokenizer splits at the space: a clean boundary
        continuation = full[len(context) :]
        logprobs = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), dim=-1)
        lls.append(sum(logprobs[len(context) - 1 + i, token].item() for i, token in enumerate(continuation)))
    return lls


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first of ties, as np.argmax


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def mmlu_rows(gold: list[int]) -> list[dict]:
    return [{"question": q, "subject": s, "choices": c, "answer": g} for (s, q, c), g in zip(MMLU, gold)]


def openbookqa_rows(gold: list[int]) -> list[dict]:
    return [
        {"id": f"q{i}", "question_stem": stem, "choices": {"text": choices, "label": LETTERS}, "answerKey": LETTERS[g]}
        for i, ((stem, choices, _), g) in enumerate(zip(OPENBOOKQA, gold))
    ]


# --------------------------------------------------------------------------- tests


def test_harness_accuracy_matches_hand_computed(model, tokenizer, tmp_path, monkeypatch):
    # Hand-computed predictions of this model on the prompts as our YAMLs format them.
    mmlu_lls = [choice_logliks(model, tokenizer, mmlu_prompt(s, q, c), LETTERS) for s, q, c in MMLU]
    obqa_lls = [choice_logliks(model, tokenizer, stem, c) for stem, c, _ in OPENBOOKQA]
    obqa_norm = [[ll / len(choice) for ll, choice in zip(lls, c)] for lls, (_, c, _) in zip(obqa_lls, OPENBOOKQA)]
    for lls in mmlu_lls + obqa_lls + obqa_norm:  # no near-ties a batched forward could flip
        top, second = sorted(lls, reverse=True)[:2]
        assert top - second > 1e-4
    mmlu_pred = [argmax(lls) for lls in mmlu_lls]
    obqa_pred = [argmax(lls) for lls in obqa_lls]
    obqa_pred_norm = [argmax(lls) for lls in obqa_norm]

    # Gold answers chosen so that the model is right on a known subset: 4/6 (MMLU), 3/5 (OBQA).
    mmlu_gold = [p if i < 4 else (p + 1) % 4 for i, p in enumerate(mmlu_pred)]
    obqa_gold = [p if i < 3 else (p + 1) % 4 for i, p in enumerate(obqa_pred)]
    hand_mmlu_acc = sum(p == g for p, g in zip(mmlu_pred, mmlu_gold)) / len(MMLU)
    hand_obqa_acc = sum(p == g for p, g in zip(obqa_pred, obqa_gold)) / len(OPENBOOKQA)
    hand_obqa_acc_norm = sum(p == g for p, g in zip(obqa_pred_norm, obqa_gold)) / len(OPENBOOKQA)
    assert (hand_mmlu_acc, hand_obqa_acc) == (4 / 6, 3 / 5)

    # Record what the harness scores (behaviour unchanged) to compare prompts and log-likelihoods too.
    from lm_eval.models.huggingface import HFLM

    scored: dict[tuple[str, str], float] = {}
    loglikelihood = HFLM.loglikelihood

    def recording_loglikelihood(self, requests, *args, **kwargs):
        results = loglikelihood(self, requests, *args, **kwargs)
        scored.update({tuple(r.args): ll for r, (ll, _) in zip(requests, results)})
        return results

    monkeypatch.setattr(HFLM, "loglikelihood", recording_loglikelihood)
    model.train()  # evaluate_capability must give it back in the mode it found it
    result = evaluate_capability(
        model,
        tokenizer,
        {
            "mmlu": write_jsonl(tmp_path / "mmlu.jsonl", mmlu_rows(mmlu_gold)),
            "openbookqa": str(write_jsonl(tmp_path / "obqa.jsonl", openbookqa_rows(obqa_gold))),
        },
        batch_size=4,
    )
    assert model.training
    model.eval()

    assert result["mmlu"] == {"acc": pytest.approx(hand_mmlu_acc, abs=1e-12), "acc_norm": None, "num_samples": 6}
    assert result["openbookqa"] == {
        "acc": pytest.approx(hand_obqa_acc, abs=1e-12),
        "acc_norm": pytest.approx(hand_obqa_acc_norm, abs=1e-12),
        "num_samples": 5,
    }
    import lm_eval

    assert result["lm_eval_version"] == lm_eval.__version__

    # The harness scored exactly our prompts and continuations, with the same log-likelihoods.
    expected = {}
    for (s, q, c), lls in zip(MMLU, mmlu_lls):
        expected.update({(mmlu_prompt(s, q, c), f" {letter}"): ll for letter, ll in zip(LETTERS, lls)})
    for (stem, c, _), lls in zip(OPENBOOKQA, obqa_lls):
        expected.update({(stem, f" {choice}"): ll for choice, ll in zip(c, lls)})
    assert set(scored) == set(expected)
    for key, ll in expected.items():
        assert scored[key] == pytest.approx(ll, abs=1e-4), key


def test_rigged_uniform_model(uniform_model, tokenizer, tmp_path):
    """With all next tokens equally likely, a choice's log-likelihood is -len(tokens) * log V.

    MMLU: " A".." D" have the same token count, so all tie and lm-eval takes the first: accuracy is
    the share of questions whose answer is A. OpenBookQA: the choice with fewest tokens wins, which
    is the short choice of each question: accuracy is the share whose answer is the short choice.
    """
    letter_lengths = {len(tokenizer.encode("Answer: " + x)) - len(tokenizer.encode("Answer:")) for x in LETTERS}
    assert len(letter_lengths) == 1
    for stem, choices, short in OPENBOOKQA:
        lengths = [len(tokenizer.encode(f"{stem} {c}")) for c in choices]
        assert all(lengths[short] < n for i, n in enumerate(lengths) if i != short)

    mmlu_gold = [0, 1, 0, 2, 0, 3]  # A for 3 of 6
    obqa_gold = [short for *_, short in OPENBOOKQA[:3]] + [(short + 1) % 4 for *_, short in OPENBOOKQA[3:]]
    result = evaluate_capability(
        uniform_model,
        tokenizer,
        {
            "mmlu": write_jsonl(tmp_path / "mmlu.jsonl", mmlu_rows(mmlu_gold)),
            "openbookqa": write_jsonl(tmp_path / "obqa.jsonl", openbookqa_rows(obqa_gold)),
        },
        batch_size=8,
    )
    assert result["mmlu"]["acc"] == pytest.approx(3 / 6, abs=1e-12)
    assert result["openbookqa"]["acc"] == pytest.approx(3 / 5, abs=1e-12)


def test_flat_formats_normalize_like_jsonl(tmp_path):
    """CSV (nested columns as JSON text, letter answers) and parquet read into the same docs as jsonl."""
    import datasets
    import pandas as pd

    rows = mmlu_rows([1, 2, 3, 0, 1, 2])
    jsonl = write_jsonl(tmp_path / "mmlu.jsonl", rows)
    csv_path = tmp_path / "mmlu.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["question", "subject", "choices", "answer"])
        writer.writeheader()
        writer.writerows({**r, "choices": json.dumps(r["choices"]), "answer": LETTERS[r["answer"]]} for r in rows)
    parquet = tmp_path / "mmlu.parquet"
    pd.DataFrame(rows).to_parquet(parquet)

    docs = {}
    for path in (jsonl, csv_path, parquet):
        config = local_task_config("mmlu", path)
        assert config["task"] == "sdd_mmlu_local" and config["output_type"] == "multiple_choice"
        assert config["dataset_path"] == {".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}[path.suffix]
        assert config["dataset_kwargs"]["data_files"] == {"test": str(path.resolve())}
        raw = datasets.load_dataset(config["dataset_path"], **config["dataset_kwargs"])["test"]
        docs[path.suffix] = config["process_docs"](raw).to_list()
    assert docs[".jsonl"] == docs[".csv"] == docs[".parquet"]
    assert [d["answer"] for d in docs[".csv"]] == [1, 2, 3, 0, 1, 2]

    arc = tmp_path / "arc.csv"
    with arc.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["question", "choices", "answerKey"])
        writer.writeheader()
        writer.writerow(
            {
                "question": "Which is a gas?",
                "choices": json.dumps({"text": ["ice", "steam"], "label": ["1", "2"]}),
                "answerKey": "2",
            }
        )  # read back by the CSV builder as the int 2
    for name in ("arc_challenge", "arc_easy"):  # one layout; ARC-Easy is SEAM's ARC
        config = local_task_config(name, arc)
        assert config["task"] == f"sdd_{name}_local"
        doc = config["process_docs"](datasets.load_dataset("csv", **config["dataset_kwargs"])["test"])[0]
        assert doc == {
            "question": "Which is a gas?",
            "choices": {"text": ["ice", "steam"], "label": ["1", "2"]},
            "answerKey": "2",
        }
    assert KNOWN_TASKS["arc_easy"][1] == "arc_easy"  # "hub": lm-eval's stock ARC-Easy task


def test_unknown_task(model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="Unknown capability task") as err:
        evaluate_capability(model, tokenizer, {"mmlu_pro": tmp_path / "x.jsonl"})
    for name in KNOWN_TASKS:
        assert name in str(err.value)


def test_missing_file(model, tokenizer, tmp_path):
    missing = tmp_path / "nowhere" / "obqa.jsonl"
    with pytest.raises(FileNotFoundError) as err:
        evaluate_capability(model, tokenizer, {"openbookqa": missing})
    assert str(missing) in str(err.value)
    assert "eval.capability.tasks.openbookqa" in str(err.value)


def test_missing_column(model, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "mmlu.jsonl", [{"question": "Q?", "options": ["a", "b", "c", "d"], "answer": 0}])
    with pytest.raises(ValueError, match="lacks column") as err:
        evaluate_capability(model, tokenizer, {"mmlu": path})
    message = str(err.value)
    assert "['choices']" in message and "['question', 'choices', 'answer']" in message
    assert "eval.capability.tasks.mmlu" in message


def test_malformed_row_and_too_many_shots(model, tokenizer, tmp_path):
    bad_key = openbookqa_rows([0])
    bad_key[0]["answerKey"] = "E"
    with pytest.raises(ValueError, match="answerKey 'E'"):
        evaluate_capability(model, tokenizer, {"openbookqa": write_jsonl(tmp_path / "bad.jsonl", bad_key)})
    with pytest.raises(ValueError, match="num_fewshot=6"):
        evaluate_capability(
            model,
            tokenizer,
            {"mmlu": write_jsonl(tmp_path / "mmlu.jsonl", mmlu_rows([0] * 6))},
            num_fewshot=6,
            device="cpu",
        )


def test_hub_tasks_use_stock_lm_eval_tasks(model, tokenizer, tmp_path, monkeypatch):
    """ "hub" selects lm-eval's stock task (no download here: the harness entry points are faked)."""
    import lm_eval.evaluator
    import lm_eval.tasks

    seen = {}

    class FakeTaskManager:
        def __init__(self, include_path=None, include_defaults=True, **kwargs):
            seen["include"] = (include_path, include_defaults)

    def fake_simple_evaluate(model, tasks, **kwargs):
        seen["tasks"], seen["kwargs"] = tasks, kwargs
        return {
            "results": {  # the shape of lm-eval 0.4.13's results (a group, a task, a local task)
                "mmlu": {
                    "name": "mmlu",
                    "alias": "mmlu",
                    "sample_len": 14042,
                    "acc,none": 0.25,
                    "acc_stderr,none": "N/A",
                },
                "mmlu_anatomy": {"alias": "anatomy", "sample_len": 135, "acc,none": 0.3},
                "hellaswag": {"alias": "hellaswag", "sample_len": 10042, "acc,none": 0.3, "acc_norm,none": 0.35},
                "sdd_openbookqa_local": {
                    "alias": "sdd_openbookqa_local",
                    "sample_len": 5,
                    "acc,none": 0.2,
                    "acc_norm,none": 0.4,
                },
            }
        }

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", FakeTaskManager)
    monkeypatch.setattr(lm_eval.evaluator, "simple_evaluate", fake_simple_evaluate)
    result = evaluate_capability(
        model,
        tokenizer,
        {"mmlu": "hub", "hellaswag": "HUB", "openbookqa": write_jsonl(tmp_path / "o.jsonl", openbookqa_rows([0] * 5))},
        batch_size=2,
        limit=3,
        num_fewshot=1,
    )
    assert seen["tasks"][:2] == ["mmlu", "hellaswag"]
    assert seen["tasks"][2]["task"] == "sdd_openbookqa_local"
    assert seen["include"][1] is True and Path(seen["include"][0]).name == "lm_eval_tasks"
    assert (seen["kwargs"]["limit"], seen["kwargs"]["num_fewshot"]) == (3, 1)
    assert result["mmlu"] == {"acc": 0.25, "acc_norm": None, "num_samples": 14042}
    assert result["hellaswag"] == {"acc": 0.3, "acc_norm": 0.35, "num_samples": 10042}
    assert result["openbookqa"] == {"acc": 0.2, "acc_norm": 0.4, "num_samples": 5}


def test_all_local_tasks_run_with_fewshot(model, tokenizer, tmp_path):
    """Every shipped task YAML runs end to end (ARC as CSV, MMLU as parquet), with one shot."""
    import pandas as pd

    parquet = tmp_path / "mmlu.parquet"
    pd.DataFrame(mmlu_rows([0, 1, 2])).to_parquet(parquet)
    arc = tmp_path / "arc.csv"
    with arc.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "question", "choices", "answerKey"])
        writer.writeheader()
        for i, (question, key) in enumerate(
            [("Which is a gas?", "2"), ("Which is solid?", "1"), ("Which is hot?", "2")]
        ):
            writer.writerow(
                {
                    "id": i,
                    "question": question,
                    "answerKey": key,
                    "choices": json.dumps({"text": ["ice", "steam"], "label": ["1", "2"]}),
                }
            )
    hellaswag = write_jsonl(
        tmp_path / "hellaswag.jsonl",
        [
            {
                "activity_label": "Baking",
                "ctx_a": "She mixes the flour.",
                "ctx_b": "then",
                "ctx": "She mixes the flour. then",
                "endings": ["she bakes it.", "she swims [title] away.", "the sun sets."],
                "label": "0",
            },
            {"ctx": "He opens the door and", "endings": ["walks in.", "eats the door.", "sings loudly."], "label": 0},
        ],
    )
    truthfulqa = write_jsonl(
        tmp_path / "truthfulqa.jsonl",
        [
            {"question": "Is the sun a star?", "mc1_targets": {"choices": ["Yes", "No"], "labels": [1, 0]}},
            {
                "question": "Can pigs fly?",
                "mc1_targets": {"choices": ["Yes", "No", "Only on Sundays"], "labels": [0, 1, 0]},
            },
        ],
    )
    result = evaluate_capability(
        model,
        tokenizer,
        {
            "mmlu": parquet,
            "openbookqa": write_jsonl(tmp_path / "o.jsonl", openbookqa_rows([0, 1, 2, 3, 0])),
            "arc_challenge": arc,
            "arc_easy": arc,
            "hellaswag": hellaswag,
            "truthfulqa_mc1": truthfulqa,
        },
        num_fewshot=1,
        batch_size=16,
    )
    sizes = {"mmlu": 3, "openbookqa": 5, "arc_challenge": 3, "arc_easy": 3, "hellaswag": 2, "truthfulqa_mc1": 2}
    for name, size in sizes.items():
        assert result[name]["num_samples"] == size
        assert 0.0 <= result[name]["acc"] <= 1.0
        assert (result[name]["acc_norm"] is None) == (name in ("mmlu", "truthfulqa_mc1"))
