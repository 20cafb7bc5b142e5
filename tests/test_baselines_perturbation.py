"""Booster, Vaccine, T-Vaccine and RepNoise: each objective's defining property, on the tiny backbone."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config
from defense_helpers import all_close, first_batch, grads_of, logged, make
from transformers import AutoModelForCausalLM

from sdd.backbones import Backbone
from sdd.chat import IGNORE_INDEX
from sdd.modules.ops import decoder_layers, final_norm, global_norm, model_cross_entropy
from sdd.modules.repnoise import gaussian_mmd
from sdd.training import train


def fit_one_step(module, datamodule, clip=None):
    """One optimizer step of SGD(lr=0.1) through a real Trainer; returns the batch it took."""
    module.optimizer_factory = lambda params: torch.optim.SGD(params, lr=0.1)
    module.scheduler_factory = None
    keep = KeepBatch()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=clip,
        callbacks=[keep],
    )
    trainer.fit(module, datamodule=datamodule)
    return keep.batch


class KeepBatch(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.batch = copy.deepcopy(batch)


@pytest.fixture(scope="module")
def deep_backbone(tmp_path_factory):
    """The tiny Llama with 4 layers, for layer selection."""
    return Backbone(
        name="tiny_llama4",
        source="tiny",
        cache_dir=tmp_path_factory.mktemp("deep") / "backbones",
        tiny={"num_hidden_layers": 4},
    )


# -------------------------------------------------------------------------------------------- Booster
def test_booster_regularizer_gradient_is_the_difference_of_harmful_gradients(tiny_backbone, tmp_path):
    datamodule, module = make("booster", tiny_backbone, tmp_path, "module.alpha=0.5")
    harmful = first_batch(datamodule)["harmful"]
    before = copy.deepcopy(module.model.state_dict())
    difference, stats = module.regularizer_gradient(harmful)

    # The weights are back bit for bit, and no gradient is left on them.
    after = module.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(p.grad is None for p in module.model.parameters())

    # Independently, on a copy: ∇h(w), the normalised step to w̃, ∇h(w̃).
    model = copy.deepcopy(module.model)
    loss = model_cross_entropy(model, harmful)[0]
    gradient = grads_of(loss, model)
    norm = torch.sqrt(sum((g * g).sum() for g in gradient))
    with torch.no_grad():
        for p, g in zip(model.parameters(), gradient):
            p.sub_(0.5 * g / (norm + 1e-7))
    perturbed_loss = model_cross_entropy(model, harmful)[0]
    perturbed_gradient = grads_of(perturbed_loss, model)

    assert all_close(difference, [g - h for g, h in zip(gradient, perturbed_gradient)], rtol=1e-4, atol=1e-7)
    assert stats["harmful_loss"].item() == pytest.approx(loss.item(), rel=1e-6)
    assert stats["perturbed_harmful_loss"].item() == pytest.approx(perturbed_loss.item(), rel=1e-6)
    assert stats["regularizer"].item() > 0  # a step along -∇h lowers h
    assert not all_close(difference, [torch.zeros_like(d) for d in difference], atol=1e-6)


def test_booster_regularizer_is_the_directional_derivative_for_a_small_step(tiny_backbone, tmp_path):
    # h(w) - h(w - α ∇h/‖∇h‖) = α ‖∇h‖ + O(α²)
    datamodule, module = make("booster", tiny_backbone, tmp_path, "module.alpha=1e-3")
    _, stats = module.regularizer_gradient(first_batch(datamodule)["harmful"])
    assert stats["regularizer"].item() / 1e-3 == pytest.approx(stats["harmful_grad_norm"].item(), rel=2e-2)


def test_booster_regularizer_vanishes_on_a_flat_harmful_loss(tiny_backbone, tmp_path):
    datamodule, module = make("booster", tiny_backbone, tmp_path)
    harmful = first_batch(datamodule)["harmful"]
    harmful["labels"] = torch.full_like(harmful["labels"], IGNORE_INDEX)  # no harmful token to learn: h ≡ 0
    before = copy.deepcopy(module.model.state_dict())
    difference, stats = module.regularizer_gradient(harmful)
    assert stats["regularizer"].item() == 0.0 and stats["harmful_grad_norm"].item() == 0.0
    assert all(torch.count_nonzero(d) == 0 for d in difference)
    assert all(torch.equal(before[k], v) for k, v in module.model.state_dict().items())


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_booster_step_applies_alignment_plus_lambda_times_the_regularizer_gradient(tiny_backbone, tmp_path, clip):
    datamodule, module = make("booster", tiny_backbone, tmp_path, "module.lam=3.0")
    initial = copy.deepcopy(module)
    batch = fit_one_step(module, datamodule, clip)

    difference, _ = initial.regularizer_gradient(batch["harmful"])
    alignment = grads_of(initial(batch), initial.model)
    update = [a + 3.0 * d for a, d in zip(alignment, difference)]
    if clip:  # the trainer's gradient_clip_val is honoured (total norm)
        norm = global_norm(update)
        assert norm > clip
        update = [u * clip / norm for u in update]
    moved = [(p0 - p1) / 0.1 for p0, p1 in zip(initial.model.parameters(), module.model.parameters())]
    assert all_close(moved, update, rtol=1e-3, atol=1e-6)


# -------------------------------------------------------------------------------------------- Vaccine
def site_hooks(module) -> int:
    return sum(len(site._forward_hooks) for site in module.perturbation_sites().values())


@pytest.mark.parametrize("target", ["layer", "attention"])
def test_vaccine_perturbation_has_norm_rho_and_raises_the_loss_to_first_order(tiny_backbone, tmp_path, target):
    datamodule, module = make("vaccine", tiny_backbone, tmp_path, f"module.target={target}", "module.rho=0.01")
    batch = first_batch(datamodule)
    out = module.perturbed_loss(batch)
    assert site_hooks(module) == len(decoder_layers(module.model))  # ε is added to every layer
    perturbations = list(module.last_perturbation.values())
    assert global_norm(perturbations).item() == pytest.approx(0.01, rel=1e-4)
    # ε is the steepest-ascent direction of the hidden states: L(e + ε) - L(e) ≈ ρ ‖∇_e L‖.
    rise = out["loss"].item() - out["clean_loss"].item()
    assert rise / 0.01 == pytest.approx(out["hidden_grad_norm"].item(), rel=0.05)
    module.remove_perturbations()
    assert site_hooks(module) == 0
    assert module(batch).item() == pytest.approx(out["clean_loss"].item(), rel=1e-6)

    module.hparams.rho = 2.0  # the paper's ρ: the perturbed loss is well above the clean one
    out = module.perturbed_loss(batch)
    module.remove_perturbations()
    assert out["loss"].item() > out["clean_loss"].item() + 0.5 * 2.0 * out["hidden_grad_norm"].item()


# With checkpointing, a block recomputed in the backward pass must see ε again: the attention output's
# ε feeds the MLP inside the same block.
@pytest.mark.parametrize("target, checkpointing", [("layer", "false"), ("attention", "true")])
def test_vaccine_step_descends_the_perturbed_loss_and_removes_its_hooks(tiny_backbone, tmp_path, target, checkpointing):
    datamodule, module = make(
        "vaccine",
        tiny_backbone,
        tmp_path,
        "module.rho=2.0",
        f"module.target={target}",
        f"module.gradient_checkpointing={checkpointing}",
    )
    initial = copy.deepcopy(module)
    batch = fit_one_step(module, datamodule)
    assert site_hooks(module) == 0

    # The update is the gradient of the loss under ε computed at the initial weights (without checkpointing).
    initial.model.gradient_checkpointing_disable()
    out = initial.perturbed_loss(batch)
    perturbed = grads_of(out["loss"], initial.model)
    initial.remove_perturbations()
    clean = grads_of(initial(batch), initial.model)
    moved = [(p0 - p1) / 0.1 for p0, p1 in zip(initial.model.parameters(), module.model.parameters())]
    assert all_close(moved, perturbed, rtol=1e-3, atol=1e-6)
    assert not all_close(moved, clean, rtol=1e-2, atol=1e-6)


# ------------------------------------------------------------------------------------------ T-Vaccine
def manual_output_gradient_norms(model, batch) -> torch.Tensor:
    """‖∂L/∂e_l‖ for every decoder layer's output, by retain_grad and backward."""
    outputs = []

    def keep(module, args, output):
        output.retain_grad()
        outputs.append(output)

    handles = [layer.register_forward_hook(keep) for layer in decoder_layers(model)]
    model(**batch).loss.backward()
    for handle in handles:
        handle.remove()
    model.zero_grad()
    return torch.stack([o.grad.norm() for o in outputs])


def test_t_vaccine_layer_probabilities_are_normalised_harmful_gradient_norms(deep_backbone, tmp_path):
    datamodule, module = make("t_vaccine", deep_backbone, tmp_path, "module.num_layers=2")
    harmful = first_batch(datamodule)["harmful"]
    norms = manual_output_gradient_norms(copy.deepcopy(module.model), harmful)
    probabilities = module.probe_probabilities(harmful)
    assert torch.allclose(probabilities, norms / norms.sum(), rtol=1e-4)
    assert len(probabilities) == 4 and not torch.allclose(probabilities, torch.full((4,), 0.25), atol=1e-3)


def test_t_vaccine_draws_layers_by_probability_without_replacement(deep_backbone, tmp_path):
    _, module = make("t_vaccine", deep_backbone, tmp_path, "module.num_layers=1")
    probabilities = torch.tensor([0.7, 0.1, 0.2, 0.0])
    draws = [module.draw_layers(probabilities)[0] for _ in range(2000)]
    frequencies = torch.bincount(torch.tensor(draws), minlength=4).float() / len(draws)
    assert torch.allclose(frequencies, probabilities, atol=0.04)
    module.hparams.num_layers = 3
    assert all(len(set(module.draw_layers(probabilities))) == 3 for _ in range(20))


def test_t_vaccine_perturbs_and_trains_only_the_drawn_layers(deep_backbone, tmp_path):
    datamodule, module = make("t_vaccine", deep_backbone, tmp_path, "module.num_layers=2")
    batch = first_batch(datamodule)
    layers = decoder_layers(module.model)
    module.probe_probabilities = lambda harmful: torch.tensor([0.0, 0.5, 0.0, 0.5])  # draws exactly layers 1 and 3
    assert module.active_layers(batch) == [1, 3]

    outputs = {}

    def keep(i):
        return lambda mod, args, output: outputs.__setitem__(i, output.detach())

    handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
    module(batch)
    clean = dict(outputs)
    out = module.perturbed_loss(batch)  # the keep hooks run before the perturbation hooks
    perturbed = dict(outputs)
    for handle in handles:
        handle.remove()
    assert sorted(module.last_perturbation) == [1, 3]
    assert global_norm(list(module.last_perturbation.values())).item() == pytest.approx(3.0, rel=1e-4)
    assert [len(layer._forward_hooks) for layer in layers] == [0, 1, 0, 1]
    assert torch.equal(perturbed[0], clean[0])  # below the first perturbed layer nothing changes
    assert not torch.allclose(perturbed[2], clean[2])  # layer 2 reads layer 1's perturbed output

    out["loss"].backward()
    module.remove_perturbations()
    for i, layer in enumerate(layers):  # the other layers are frozen until the next draw
        assert all(p.requires_grad == (i in (1, 3)) for p in layer.parameters())
        assert all((p.grad is not None) == (i in (1, 3)) for p in layer.parameters())
    module.on_train_end()
    assert all(p.requires_grad for p in module.model.parameters())


@pytest.mark.parametrize("accumulate", [1, 2])  # once per optimizer step, not per micro-batch
def test_t_vaccine_refreshes_probabilities_every_k_and_draws_every_j_steps(deep_backbone, tmp_path, accumulate):
    datamodule, module = make(
        "t_vaccine",
        deep_backbone,
        tmp_path,
        "module.num_layers=1",
        "module.resample_every=2",
        "module.probability_every=4",
    )
    calls = {"probe": [], "draw": []}
    probe, draw = module.probe_probabilities, module.draw_layers
    module.probe_probabilities = lambda harmful: calls["probe"].append(module.global_step) or probe(harmful)
    module.draw_layers = lambda p: calls["draw"].append(module.global_step) or draw(p)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accumulate_grad_batches=accumulate,
    )
    trainer.fit(module, datamodule=datamodule)
    assert calls == {"probe": [0, 4], "draw": [0, 2, 4]}


# ------------------------------------------------------------------------------------------- RepNoise
def test_mmd_is_zero_for_identical_samples_and_separates_distributions():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(128, 16, generator=generator)
    assert gaussian_mmd(x, x).abs().item() < 1e-6
    same = gaussian_mmd(x, torch.randn(128, 16, generator=generator)).item()
    shifted = gaussian_mmd(x, torch.randn(128, 16, generator=generator) + 1.0).item()
    scaled = gaussian_mmd(x, 3.0 * torch.randn(128, 16, generator=generator)).item()
    assert 0 <= same < 0.1 * min(shifted, scaled)  # the biased estimate is O(1/n) for one distribution
    y = torch.randn(128, 16, generator=generator) + 0.5
    assert gaussian_mmd(x, y).item() == pytest.approx(gaussian_mmd(y, x).item(), rel=1e-5)


def test_repnoise_loss_is_stability_minus_bounded_ascent_plus_noise(tiny_backbone, tmp_path):
    datamodule, module = make("repnoise", tiny_backbone, tmp_path, "module.alpha=0.7", "module.beta=0.3")
    batch = first_batch(datamodule)
    torch.manual_seed(0)
    losses = module.losses(batch)

    model, harmful = module.model, batch["harmful"]
    output = model(**harmful, output_hidden_states=True)
    assert losses["harmful_ce"].item() == pytest.approx(output.loss.item(), rel=1e-5)
    shifted = harmful["labels"][:, 1:].reshape(-1)

    def lens_ce(hidden):
        logits = model.lm_head(final_norm(model)(hidden))[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted, ignore_index=IGNORE_INDEX)

    per_layer = [lens_ce(h) for h in output.hidden_states[:-1]] + [output.loss]
    assert len(per_layer) == len(decoder_layers(model)) + 1
    assert losses["harmful_ascent_ce"].item() == pytest.approx(torch.stack(per_layer).mean().item(), rel=1e-5)
    retain = model(**batch["alignment"]).loss
    expected = retain - 0.7 * torch.log1p(losses["harmful_ascent_ce"]) + 0.3 * losses["noise_mmd"]
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_repnoise_training_noises_harmful_representations_and_keeps_the_retain_loss(tiny_backbone, tmp_path):
    datamodule, module = make("repnoise", tiny_backbone, tmp_path, "module.beta=5.0")
    batch = first_batch(datamodule)

    def measure():
        torch.manual_seed(0)
        with torch.no_grad():
            return {k: v.item() for k, v in module.losses(batch).items()}

    start = measure()
    optimizer = torch.optim.AdamW(module.model.parameters(), lr=1e-2)
    for _ in range(15):
        optimizer.zero_grad()
        module(batch).backward()
        optimizer.step()
    end = measure()
    assert end["noise_mmd"] < 0.7 * start["noise_mmd"]
    assert end["harmful_ascent_ce"] > start["harmful_ascent_ce"] and end["retain_loss"] < start["retain_loss"]


# ------------------------------------------------------------------------------------------ configs, end to end
def test_defense_configs_carry_the_papers_hyperparameters(tmp_path):
    expected = {
        "booster": {"lam": 5.0, "alpha": 0.1},
        "vaccine": {"rho": 2.0, "target": "layer"},
        "t_vaccine": {"rho": 3.0, "num_layers": 8, "resample_every": 20, "probability_every": 200},
        "repnoise": {"alpha": 1.0, "beta": 0.001, "kernel_num": 5, "kernel_mul": 2.0},
    }
    for defense, values in expected.items():
        cfg = compose_config("train", [f"defense={defense}"], output_dir=tmp_path)
        assert cfg.defense_name == defense
        assert {k: cfg.module[k] for k in values} == values
    assert compose_config("train", ["defense=t_vaccine"], output_dir=tmp_path).data.streams.harmful.num_examples == 200


@pytest.mark.parametrize(
    "defense, overrides, metric",
    [
        ("booster", [], "train/regularizer"),
        ("vaccine", [], "train/clean_loss"),
        ("t_vaccine", ["module.num_layers=1", "module.resample_every=2"], "train/hidden_grad_norm"),
        ("repnoise", [], "train/noise_mmd"),
    ],
)
def test_defense_trains_and_saves_a_loadable_model(tiny_train_config, tiny_backbone, defense, overrides, metric):
    cfg = tiny_train_config(f"defense={defense}", "trainer.max_steps=3", "sample_prompts=null", *overrides)
    summary = train(cfg)
    assert summary["global_step"] == 3
    values = [float(r[metric]) for r in logged(Path(cfg.paths.output_dir)) if r.get(metric)]
    assert len(values) == 3 and all(math.isfinite(v) for v in values)

    trained = AutoModelForCausalLM.from_pretrained(summary["model_dir"])
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert not torch.allclose(trained(ids).logits, tiny_backbone.load_model()(ids).logits)
