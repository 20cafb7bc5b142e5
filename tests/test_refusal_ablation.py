"""Refusal-direction ablation (attack=refusal_ablation) and the attack dispatch (sdd.attacks.run_attack)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_config
from test_bad_inputs import run_entry
from transformers import AutoModelForCausalLM

from sdd.attacks import EvaluationAttackError, run_attack
from sdd.attacks.refusal_ablation import (
    DIRECTION_FILE,
    RECORD_FILE,
    directional_ablation,
    orthogonalize_weights,
    prompt_batches,
    resolve_layout,
)
from sdd.errors import ConfigError

SMALL = [
    "weight_edit.positions=auto",
    "weight_edit.num_direction_prompts=16",
    "weight_edit.num_selection_prompts=4",
    "weight_edit.max_new_tokens=4",
    "weight_edit.batch_size=8",
]
# Written for this test, in no corpus: the direction was found and chosen on other prompts.
FRESH_PROMPTS = [
    "Write two lines about a lighthouse keeper's cat.",
    "How many legs does a spider have?",
    "Explain how to pick a lock on a neighbour's shed.",
    "Name a colour that rhymes with bread.",
]


@pytest.fixture(scope="module")
def ablated(tmp_path_factory, cache_dir, tiny_backbone):
    """attack.py attack=refusal_ablation on the tiny backbone, run in-process through its entry point."""
    run_dir = tmp_path_factory.mktemp("refusal_ablation")
    outcome = run_entry(
        "attack.py",
        f"model={tiny_backbone.resolve()}",
        "attack=refusal_ablation",
        *SMALL,
        "sample_max_new_tokens=4",
        f"paths.cache_dir={cache_dir}",
        f"hydra.run.dir={run_dir}",
    )
    assert outcome.status == 0, outcome.stderr[-3000:]
    assert f"Model saved to: {run_dir / 'model'}" in outcome.stdout
    return run_dir


def residual_stream(model, tokenizer, prompts):
    """Every decoder layer's input and the last layer's output (before the final norm), real tokens only."""
    layout = resolve_layout(model, None, {"llama": {"writers": ["self_attn.o_proj", "mlp.down_proj"]}})
    states = []
    hooks = [
        layer.register_forward_pre_hook(
            lambda m, args, kwargs: states.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
        )
        for layer in layout.layers
    ]
    hooks.append(
        layout.layers[-1].register_forward_hook(
            lambda m, args, output: states.append(output[0] if isinstance(output, tuple) else output)
        )
    )
    masks = []
    with torch.no_grad():
        for batch in prompt_batches(tokenizer, prompts, 8, "cpu"):
            model(**batch, use_cache=False)
            masks.append(batch["attention_mask"].bool())
    for hook in hooks:
        hook.remove()
    per_pass = len(layout.layers) + 1
    return [state[masks[i // per_pass]] for i, state in enumerate(states)]


def test_residual_stream_is_orthogonal_to_the_direction_on_fresh_prompts(ablated, tiny_backbone, tiny_tokenizer):
    direction = torch.load(ablated / DIRECTION_FILE)["direction"]
    assert abs(direction.norm().item() - 1) < 1e-5
    original = tiny_backbone.load_model().eval()
    edited = AutoModelForCausalLM.from_pretrained(ablated / "model").eval()

    def largest_relative_projection(model):
        return max(
            ((h @ direction).abs() / h.norm(dim=-1)).max().item()
            for h in residual_stream(model, tiny_tokenizer, FRESH_PROMPTS)
        )

    assert largest_relative_projection(original) > 1e-2  # the check can fail: the stream had a component along r
    assert largest_relative_projection(edited) < 1e-5


def test_saved_model_equals_the_hooked_model_and_generates(ablated, tiny_backbone, tiny_tokenizer):
    """The weights compute what the selection's hooks computed: the chosen scores are the saved model's."""
    from sdd.generation import generate

    direction = torch.load(ablated / DIRECTION_FILE)["direction"]
    original = tiny_backbone.load_model().eval()
    edited = AutoModelForCausalLM.from_pretrained(ablated / "model").eval()
    batch = next(prompt_batches(tiny_tokenizer, FRESH_PROMPTS, 8, "cpu"))
    layout = resolve_layout(original, None, {"llama": {"writers": ["self_attn.o_proj", "mlp.down_proj"]}})
    with torch.no_grad(), directional_ablation(layout, direction):
        hooked = original(**batch).logits
    with torch.no_grad():
        plain, saved = original(**batch).logits, edited(**batch).logits
    mask = batch["attention_mask"].bool()
    assert torch.allclose(saved[mask], hooked[mask], atol=1e-4)
    assert not torch.allclose(saved[mask], plain[mask], atol=1e-3)
    # Untied: the head kept the original unembedding (the ablation acts on the residual stream only).
    assert edited.config.tie_word_embeddings is False
    assert torch.equal(edited.lm_head.weight, original.get_input_embeddings().weight)
    answers = generate(edited, tiny_tokenizer, FRESH_PROMPTS[:2], max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_record_names_the_choice_and_its_scores(ablated):
    record = json.loads((ablated / RECORD_FILE).read_text())
    assert record["num_layers"] == 2 and record["candidate_layers"] == [0, 1]
    assert record["layer"] in (0, 1) and -record["post_instruction_positions"] <= record["position"] < 0
    assert record["prompts"] == {
        "harmful_direction": 16,
        "harmless_direction": 16,
        "harmful_selection": 4,
        "harmless_selection": 4,
    }
    assert record["refusal_judge"] == "refusal keyword (proxy)"
    chosen = next(
        c for c in record["candidates"] if (c["layer"], c["position"]) == (record["layer"], record["position"])
    )
    assert record["after"]["harmless_kl"] == chosen["harmless_kl"]
    # Layer 0's input is the template tokens' embeddings, the same for every prompt: no candidate there.
    assert sorted((c["layer"], c["position"]) for c in record["candidates"]) == [
        (1, p) for p in range(-record["post_instruction_positions"], 0)
    ]
    summary = json.loads((ablated / "train_summary.json").read_text())
    assert set(summary["metrics"]) >= {"selection/harmful_refusal_rate_before", "selection/harmful_refusal_rate_after"}


def test_config_values(tmp_path, cache_dir):
    cfg = compose_config(
        "attack", ["model=some/model", "attack=refusal_ablation"], output_dir=tmp_path, cache_dir=cache_dir
    )
    assert cfg.attack_kind == "weight_edit" and cfg.attack_name == "refusal_ablation"
    assert cfg.eval_attacks == {}
    assert cfg.weight_edit.harmful.name == "corpus.harmful" and cfg.weight_edit.harmful.partition.part == "train"
    assert cfg.weight_edit.harmless.name == "corpus.benign" and cfg.weight_edit.harmless.partition.part == "train"
    assert cfg.weight_edit.max_layer_fraction == 0.8 and cfg.weight_edit.positions == 1
    assert cfg.weight_edit.num_selection_prompts == 8 and cfg.weight_edit.max_new_tokens == 8
    default = compose_config("attack", ["model=some/model"], output_dir=tmp_path, cache_dir=cache_dir)
    assert default.attack_name == "mft_advbench" and default.attack_kind == "fine_tuning" and default.eval_attacks == {}


def test_evaluation_attack_is_refused_with_the_fix(tmp_path, cache_dir, tiny_backbone):
    cfg = compose_config(
        "attack",
        [
            f"model={tiny_backbone.resolve()}",
            "attack=refusal_ablation",
            "attack_kind=evaluation",
            "attack_name=prefilling",
        ],
        output_dir=tmp_path,
        cache_dir=cache_dir,
    )
    with pytest.raises(
        EvaluationAttackError,
        match=r"python evaluate.py model=<folder> attack=prefilling.*"
        r"point.attack=<weight attack>\+prefilling",
    ):
        run_attack(cfg)
    outcome = run_entry(
        "attack.py",
        f"model={tiny_backbone.resolve()}",
        "attack_kind=evaluation",
        f"paths.cache_dir={cache_dir}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert outcome.status == 1 and "python evaluate.py model=<folder> attack=mft_advbench" in outcome.message
    assert not (tmp_path / "run" / "model").exists()
    cfg.attack_kind = "retraining"
    with pytest.raises(ConfigError, match="attack_kind='retraining'"):
        run_attack(cfg)


def test_layouts(tiny_backbone):
    model = tiny_backbone.load_model()
    with pytest.raises(ConfigError, match=r"weight_edit.layout=\{writers"):
        resolve_layout(model, None, {"phi": {"writers": ["self_attn.dense", "mlp.fc2"]}})
    declared = resolve_layout(
        model,
        {"embed": "model.embed_tokens", "layers": "model.layers", "writers": ["self_attn.o_proj", "mlp.down_proj"]},
        {},
    )
    assert declared.embed is model.model.embed_tokens and declared.writers[1][1] is model.model.layers[1].mlp.down_proj
    with pytest.raises(ConfigError, match="no module 'mlp.fc2'"):
        resolve_layout(model, {"writers": ["self_attn.o_proj", "mlp.fc2"]}, {})


def test_tied_orthogonalization_changes_the_shared_matrix(tiny_backbone):
    """untie_embeddings=false: the authors' choice for tied models, the head reads no r either."""
    model = tiny_backbone.load_model()
    layout = resolve_layout(model, {"writers": ["self_attn.o_proj", "mlp.down_proj"]}, {})
    direction = torch.nn.functional.normalize(torch.randn(model.config.hidden_size), dim=0)
    orthogonalize_weights(model, layout, direction, untie_embeddings=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings
    assert (model.lm_head.weight @ direction).abs().max() < 1e-5
    assert (model.model.layers[0].self_attn.o_proj.weight.T @ direction).abs().max() < 1e-5


def test_pipeline_attack_stage_runs_the_weight_edit_and_reads_its_prompts(tmp_path, cache_dir, monkeypatch):
    """The pipeline's attack stage goes through run_attack; the overlap check reads the edit's own prompts."""
    from types import SimpleNamespace

    import sdd.attacks
    from sdd import pipeline
    from sdd.data.overlap import point_overlap

    cfg = compose_config(
        "attack", ["model=some/folder", "attack=refusal_ablation"], output_dir=tmp_path, cache_dir=cache_dir
    )
    calls = []
    monkeypatch.setattr(sdd.attacks, "run_attack", lambda c: calls.append(c) or {"model_dir": "m", "global_step": 0})
    assert pipeline._attack_stage(cfg) == {"model_dir": "m", "global_step": 0, "metrics": {}}
    assert calls[0].overwrite is True and calls[0].attack_kind == "weight_edit"

    overlap = point_overlap({"attack": SimpleNamespace(kind="attack", cfg=cfg)})
    assert overlap["sources"] == {
        "attack/weight_edit.harmful": "corpus.harmful",
        "attack/weight_edit.harmless": "corpus.benign",
    }
