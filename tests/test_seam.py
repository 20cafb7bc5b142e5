"""SEAM on the tiny backbone: the Hessian-free gradient against autograd, exact restoration of the
weights, a short run that separates harmful and benign gradients, config errors."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from hydra.utils import instantiate
from transformers import AutoModelForCausalLM

from sdd.backbones import Backbone
from sdd.modules import SEAMModule
from sdd.modules.ops import answer_cross_entropy
from sdd.training import train


@pytest.fixture(scope="module")
def seam_batches(tiny_tokenizer, cache_dir, tmp_path_factory):
    """Four ``{harmful, benign, alignment}`` steps of data=seam on the demo corpus (batch 4, 64 tokens)."""
    cfg = compose_config(
        "train",
        ["experiment=quick_tiny", "defense=seam", "data.batch_size=4", "data.max_length=64", "data.num_examples=16"],
        output_dir=tmp_path_factory.mktemp("data"),
        cache_dir=cache_dir,
    )
    data = instantiate(cfg.data)
    data.connect(tiny_tokenizer)
    data.setup("fit")
    return [batch for batch, *_ in data.train_dataloader()]


def seam_module(backbone: Backbone, **kwargs) -> SEAMModule:
    module = SEAMModule(backbone, optimizer=None, **kwargs)
    module.configure_model()
    return module


def ce(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return answer_cross_entropy(logits, batch["labels"])


def exact_similarity_gradient(module: SEAMModule, harmful, benign) -> torch.Tensor:
    """∇_θ cos(g_a, g_b) by double backward (the reference the estimate is checked against)."""
    params = module.trainable_parameters()
    g_a = torch.autograd.grad(ce(module.model, harmful), params, create_graph=True)
    g_b = torch.autograd.grad(ce(module.model, benign), params, create_graph=True)
    dot = sum((a * b).sum() for a, b in zip(g_a, g_b))
    norm_a = sum((a * a).sum() for a in g_a).sqrt()
    norm_b = sum((b * b).sum() for b in g_b).sqrt()
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(dot / (norm_a * norm_b), params)])


def test_finite_difference_matches_the_exact_gradient_of_the_cosine(cache_dir, seam_batches):
    # Eager attention: the fused CPU attention kernel has no double backward. float64 weights, so the
    # weight perturbation and the difference of gradients carry no float32 rounding (transformers'
    # Llama still computes RMSNorm and the attention softmax in float32: ~1e-8/ε relative noise).
    backbone = Backbone(
        name="tiny_llama", source="tiny", cache_dir=cache_dir / "backbones", attn_implementation="eager"
    )
    harmful, benign = seam_batches[0]["harmful"], seam_batches[0]["benign"]
    errors = {}
    for epsilon in (1e-2, 1e-3):
        module = seam_module(backbone, epsilon=epsilon)
        module.model.double()
        exact = exact_similarity_gradient(module, harmful, benign)
        estimate, stats = module.similarity_gradient(harmful, benign)
        estimate = torch.cat([g.reshape(-1) for g in estimate])
        assert estimate.dtype == torch.float64
        errors[epsilon] = ((estimate - exact).norm() / exact.norm()).item()
    # A forward difference errs by O(ε) (third derivatives): measured 2.1e-3 relative at the default
    # ε = 1e-3. Tolerance 5e-3; a wrong sign, direction or normalisation gives errors of order 1.
    assert errors[1e-3] < 5e-3
    # ... and the error is first order: ten times smaller ε, about ten times smaller error.
    assert 7 < errors[1e-2] / errors[1e-3] < 13
    assert -1 <= stats["grad_cosine"] <= 1


def test_parameters_are_restored_exactly(tiny_backbone, seam_batches, monkeypatch):
    module = seam_module(tiny_backbone)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    batch = seam_batches[1]
    estimate, _ = module.similarity_gradient(batch["harmful"], batch["benign"])
    assert any(g.abs().sum() > 0 for g in estimate)
    for name, p in module.model.named_parameters():
        assert torch.equal(p, before[name]), name  # bit-exact, not (θ + δ) - δ
        assert p.grad is None  # the estimate is returned, .grad untouched

    # Also when a perturbed pass fails midway.
    calls = {"n": 0}
    original = SEAMModule.stream_gradient

    def failing(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:  # the first pass at perturbed weights
            raise RuntimeError("out of memory")
        return original(self, *args)

    monkeypatch.setattr(SEAMModule, "stream_gradient", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        module.similarity_gradient(batch["harmful"], batch["benign"])
    for name, p in module.model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_with_lora_only_the_adapters_are_perturbed(tiny_backbone, seam_batches):
    module = seam_module(
        tiny_backbone, lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": "all-linear"}
    )
    params = module.trainable_parameters()
    assert params and all("lora_" in n for n, p in module.model.named_parameters() if p.requires_grad)
    frozen = {n: p.detach().clone() for n, p in module.model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    batch = seam_batches[0]
    estimate, _ = module.similarity_gradient(batch["harmful"], batch["benign"])
    assert [g.shape for g in estimate] == [p.shape for p in params]
    for name, p in module.model.named_parameters():
        assert torch.equal(p, (frozen if name in frozen else adapters)[name])
    # lora_dropout is on (train mode): the perturbed pass replays the unperturbed pass's dropout masks,
    # so the finite difference stays small (different masks would make it of the gradient's size).
    assert torch.isfinite(torch.cat([g.reshape(-1) for g in estimate])).all()
    assert sum(g.norm() ** 2 for g in estimate).sqrt() < 50  # measured 2.4; ~400 without the replay


def test_unlearning_losses(tiny_backbone, seam_batches):
    batch = seam_batches[0]["harmful"]
    final = seam_module(tiny_backbone, unlearn_loss="neg_ce", unlearn_all_layers=False)
    loss, value = final.unlearning_loss(batch)
    assert loss.item() == pytest.approx(-ce(final.model, batch).item(), rel=1e-6)

    layered = seam_module(tiny_backbone, unlearn_loss="neg_log1p_ce", unlearn_all_layers=True)
    loss, value = layered.unlearning_loss(batch)
    assert loss.item() == pytest.approx(-torch.log1p(value).item())
    # The logit lens: every layer's exit through the final norm and the LM head, and the real logits.
    model = layered.model
    hidden = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
    ).hidden_states
    exits = [answer_cross_entropy(model.lm_head(model.model.norm(h)), batch["labels"]) for h in hidden[:-1]]
    exits.append(ce(model, batch))
    assert len(exits) == model.config.num_hidden_layers + 1
    assert value.item() == pytest.approx(torch.stack(exits).mean().item(), rel=1e-5)
    loss.backward()  # differentiable through every exit
    assert model.model.embed_tokens.weight.grad is not None


def test_seam_training_lowers_the_gradient_cosine(tiny_train_config, cache_dir, seam_batches):
    # Only the similarity term, so that its (estimated) gradient is what is followed.
    cfg = tiny_train_config(
        "defense=seam",
        "module.alpha=0",
        "module.unlearn_weight=0",
        "module.beta=1",
        "trainer.max_steps=10",
        "data.max_length=64",
        "optimizer.lr=3e-3",
        "sample_prompts=null",
    )
    summary = train(cfg)
    backbone = instantiate(cfg.backbone)

    def mean_cosine(model) -> float:
        module = SEAMModule(backbone, optimizer=None)
        module.model = model
        return sum(module.gradient_pair(b["harmful"], b["benign"])[3]["grad_cosine"] for b in seam_batches) / len(
            seam_batches
        )

    before = mean_cosine(backbone.load_model())
    after = mean_cosine(AutoModelForCausalLM.from_pretrained(summary["model_dir"]))
    assert after < before - 0.3, (before, after)  # measured 0.06 -> -0.74


def test_defense_seam_logs_every_term(tiny_train_config):
    cfg = tiny_train_config("defense=seam", "trainer.max_steps=4", "data.max_length=64", "sample_prompts=null")
    assert cfg.scheduler.name == "cosine" and cfg.module.warmup_ratio == 0.1
    assert (cfg.module.alpha, cfg.module.beta, cfg.module.epsilon) == (1.0, 0.01, 1e-3)
    train(cfg)
    rows = []
    for path in Path(cfg.paths.output_dir).glob("csv/version_*/metrics.csv"):
        with open(path) as handle:
            rows += [r for r in csv.DictReader(handle) if r.get("train/loss")]
    assert len(rows) == 4
    for row in rows:
        value = {
            k: float(row[f"train/{k}"])
            for k in (
                "loss",
                "grad_cosine",
                "similarity_loss",
                "unlearn_loss",
                "utility_loss",
                "lr",
                "harmful_ce",
                "benign_ce",
            )
        }
        assert -1 <= value["grad_cosine"] <= 1
        assert value["similarity_loss"] == pytest.approx(0.01 * value["grad_cosine"], rel=1e-5)
        assert value["loss"] == pytest.approx(
            value["similarity_loss"] + value["unlearn_loss"] + value["utility_loss"], rel=1e-5
        )
        assert value["unlearn_loss"] < 0  # -log(1 + CE)
    assert float(rows[0]["train/lr"]) < cfg.optimizer.lr  # linear warmup first


def test_unknown_stream_fails_with_a_clear_message(tiny_train_config):
    cfg = tiny_train_config("defense=seam", "module.benign_stream=alpaca")
    with pytest.raises(ValueError, match=r"module.benign_stream='alpaca'.*\['alignment', 'benign', 'harmful'\]"):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "model").exists()

    cfg = tiny_train_config("defense=seam", "data=sdd")
    with pytest.raises(ValueError, match="use data=seam"):
        train(cfg)


def test_bad_values_fail_at_construction(tiny_backbone):
    with pytest.raises(ValueError, match="module.unlearn_loss must be one of"):
        SEAMModule(tiny_backbone, optimizer=None, unlearn_loss="gradient_ascent")
    with pytest.raises(ValueError, match="module.epsilon must be > 0"):
        SEAMModule(tiny_backbone, optimizer=None, epsilon=0)
