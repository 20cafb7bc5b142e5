"""SimPO, DeepAlign and TAR: each objective's defining property, on the tiny backbone."""

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

from sdd.chat import IGNORE_INDEX, instruction_answer, tokenize_conversation, tokenize_prompt, user_turn
from sdd.data.sources import DataSource, load_records
from sdd.modules.deepalign import constrained_loss, token_betas
from sdd.modules.ops import answer_logprobs
from sdd.modules.simpo import simpo_loss
from sdd.training import train


def safety_pairs_source() -> DataSource:
    cfg = compose_config("train", [])
    return DataSource.from_config(dict(cfg.corpus.safety_pairs))


# ---------------------------------------------------------------------------------------------- SimPO
def test_simpo_loss_is_softplus_of_gamma_minus_the_margin():
    chosen = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    rejected = torch.tensor([-3.0, -1.0, -0.5])
    beta, gamma = 2.5, 1.375
    losses, margins = simpo_loss(chosen, rejected, beta, gamma)
    assert torch.allclose(margins, beta * (chosen - rejected))
    assert torch.allclose(losses, -F.logsigmoid(beta * (chosen - rejected) - gamma))
    assert torch.allclose(losses, torch.log1p(torch.exp(gamma - margins)))
    losses.sum().backward()
    assert (chosen.grad < 0).all()  # minimising raises the chosen answer's likelihood

    # A margin far beyond γ leaves nothing to learn.
    far = torch.tensor([0.0], requires_grad=True)
    loss, _ = simpo_loss(far, torch.tensor([-40.0]), beta, gamma)
    loss.backward()
    assert loss.item() < 1e-30 and far.grad.abs().item() < 1e-30


def test_preference_batches_mask_the_prompt_of_both_answers(tiny_backbone, tmp_path):
    datamodule, _ = make("simpo", tiny_backbone, tmp_path)
    tokenizer = datamodule.tokenizer
    records = load_records(safety_pairs_source(), required=["instruction", "safe", "unsafe"])
    by_prompt = {tuple(tokenize_prompt(tokenizer, user_turn(r["instruction"]))): r for r in records}
    batch = first_batch(datamodule)
    assert set(batch) == {"chosen", "rejected"}
    for row in range(batch["chosen"]["input_ids"].shape[0]):
        sides = {}
        for side in ("chosen", "rejected"):
            length = int(batch[side]["attention_mask"][row].sum())
            ids = batch[side]["input_ids"][row, :length].tolist()
            labels = batch[side]["labels"][row, :length].tolist()
            start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
            sides[side] = (ids[:start], tokenizer.decode(ids[start:]))
            assert labels[start:] == ids[start:] and (batch[side]["labels"][row, length:] == IGNORE_INDEX).all()
        assert sides["chosen"][0] == sides["rejected"][0]  # the prompt exactly as at inference
        record = by_prompt[tuple(sides["chosen"][0])]
        assert sides["chosen"][1].startswith(record["safe"][:20]) and sides["rejected"][1].startswith(
            record["unsafe"][:20]
        )


def test_simpo_rewards_are_length_normalised_per_answer(tiny_backbone, tmp_path):
    datamodule, module = make("simpo", tiny_backbone, tmp_path)
    batch = first_batch(datamodule)
    chosen_logps, rejected_logps = module.average_logprobs(batch)
    for side, computed in (("chosen", chosen_logps), ("rejected", rejected_logps)):
        for row in range(computed.shape[0]):  # each answer alone, unpadded
            length = int(batch[side]["attention_mask"][row].sum())
            ids, labels = (
                batch[side]["input_ids"][row : row + 1, :length],
                batch[side]["labels"][row : row + 1, :length],
            )
            logps, mask = answer_logprobs(module.model(input_ids=ids).logits, labels)
            assert torch.allclose(computed[row], logps.sum() / mask.sum(), atol=1e-5)


def test_simpo_raises_the_margin_and_has_no_gradient_far_beyond_gamma(tiny_backbone, tmp_path):
    datamodule, module = make("simpo", tiny_backbone, tmp_path)
    batch = first_batch(datamodule)
    optimizer = torch.optim.AdamW(module.model.parameters(), lr=1e-2)
    losses, margins = [], []
    for _ in range(12):
        loss, metrics = module._loss_and_metrics(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        margins.append(metrics["reward_margin"].item())
    assert losses[-1] < 0.5 * losses[0] and margins[-1] > margins[0] + 1.0

    module.hparams.gamma = -1e3  # every margin is now far beyond γ
    gradients = grads_of(module(batch), module.model)
    assert max(g.abs().max().item() for g in gradients) < 1e-20


# ------------------------------------------------------------------------------------------ DeepAlign
def recovery_cases(datamodule):
    """Each drawn example with its record, prompt tokens and k."""
    tokenizer = datamodule.streams["safety"].tokenizer
    records = load_records(safety_pairs_source(), required=["instruction", "safe", "unsafe"])
    by_prompt = {tuple(tokenize_prompt(tokenizer, user_turn(r["instruction"]))): r for r in records}
    dataset = datamodule.streams["safety"].train_set
    for index in range(len(dataset)):
        example = dataset[index]
        prompt = next(p for p in by_prompt if tuple(example.input_ids[: len(p)]) == p)
        yield example, by_prompt[prompt], len(prompt)


def test_safety_recovery_masks_exactly_the_harmful_prefix(tiny_backbone, tmp_path):
    datamodule, _ = make("deepalign", tiny_backbone, tmp_path, "data.streams.safety.augment_prob=1.0")
    tokenizer, max_length = datamodule.streams["safety"].tokenizer, datamodule.streams["safety"].max_length
    for example, record, prompt_length in recovery_cases(datamodule):
        k = example.prefix_length
        assert k >= 1
        context = prompt_length + k
        # The prompt and the harmful prefix are context: masked, and nothing else is.
        assert all(label == IGNORE_INDEX for label in example.labels[:context])
        assert example.labels[context:] == example.input_ids[context:]
        # The context continues with the first k tokens of the harmful answer, as the chat path tokenizes it.
        harmful = tokenize_conversation(tokenizer, instruction_answer(record["instruction"], record["unsafe"]), 512)
        assert example.input_ids[prompt_length:context] == harmful.input_ids[prompt_length : prompt_length + k]
        assert record["unsafe"].startswith(tokenizer.decode(example.input_ids[prompt_length:context]).strip())
        # ... and the labelled part is the whole refusal turn, end-of-turn marker included (up to max_length).
        refusal = tokenize_conversation(tokenizer, instruction_answer(record["instruction"], record["safe"]), 512)
        assert example.input_ids[context:] == refusal.input_ids[prompt_length:][: max_length - context]
        assert len(example.input_ids) == min(max_length, context + len(refusal.input_ids) - prompt_length)


def test_safety_recovery_draws_k_per_use_and_keeps_plain_refusals(tiny_backbone, tmp_path):
    datamodule, _ = make("deepalign", tiny_backbone, tmp_path, "data.streams.safety.max_prefix_tokens=3")
    dataset = datamodule.streams["safety"].train_set
    draws = [dataset[0].prefix_length for _ in range(40)]
    assert set(draws) <= {0, 1, 2, 3} and len(set(draws)) >= 3  # redrawn on every use, capped at 3
    assert 0.2 < draws.count(0) / len(draws) < 0.8  # about half are plain refusal examples (k = 0)

    plain, _ = make("deepalign", tiny_backbone, tmp_path / "plain", "data.streams.safety.augment_prob=0.0")
    tokenizer = plain.streams["safety"].tokenizer
    for example, record, _ in recovery_cases(plain):  # k = 0: exactly the ordinary SFT example
        expected = tokenize_conversation(tokenizer, instruction_answer(record["instruction"], record["safe"]), 128)
        assert (example.input_ids, example.labels, example.prefix_length) == (expected.input_ids, expected.labels, 0)


def test_token_betas_follow_the_paper_schedule():
    mask = torch.tensor([[False, False, True, True, True, True, True, True, True, False]])
    betas = token_betas(mask, beta=0.1, prefix_beta=2.0, first_token_beta=0.5, prefix_length=5)
    assert betas[0, 2:9].tolist() == pytest.approx([0.5, 2.0, 2.0, 2.0, 2.0, 0.1, 0.1])


def test_constrained_objective_is_cross_entropy_at_the_reference_and_as_beta_vanishes(tiny_backbone, tmp_path):
    datamodule, module = make("deepalign", tiny_backbone, tmp_path, "data.streams.safety.augment_prob=1.0")
    safety = first_batch(datamodule)["safety"]
    model = module.model

    def losses():
        logits = model(input_ids=safety["input_ids"], attention_mask=safety["attention_mask"]).logits
        logps, mask = answer_logprobs(logits, safety["labels"])
        with torch.no_grad(), module.reference.active() as reference:
            reference_logps, _ = answer_logprobs(
                reference(input_ids=safety["input_ids"], attention_mask=safety["attention_mask"]).logits,
                safety["labels"],
            )
        return logps, reference_logps, mask

    # At the initial (reference) model every token's weight 2σ(0) is 1: the gradient is the CE gradient.
    logps, reference_logps, mask = losses()
    assert torch.allclose(logps, reference_logps)
    hp = module.hparams
    betas = token_betas(mask, hp.beta, hp.prefix_beta, hp.first_token_beta, hp.prefix_length)
    constrained, ce = constrained_loss(logps, reference_logps, betas, mask), -(logps * mask).sum() / mask.sum()
    assert all_close(grads_of(constrained, model), grads_of(ce, model), rtol=1e-4, atol=1e-7)
    assert module.safety_loss(safety)[0].item() == pytest.approx(constrained.item(), rel=1e-5)

    # Away from the reference the two differ, unless β_t -> 0.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    logps, reference_logps, mask = losses()
    ce_grads = grads_of(-(logps * mask).sum() / mask.sum(), model)
    assert not all_close(grads_of(constrained_loss(logps, reference_logps, betas, mask), model), ce_grads, rtol=1e-2)
    tiny_betas = torch.full_like(betas, 1e-5)
    assert all_close(
        grads_of(constrained_loss(logps, reference_logps, tiny_betas, mask), model), ce_grads, rtol=1e-3, atol=1e-7
    )


def test_deepalign_mixes_safety_and_utility_with_alpha(tiny_backbone, tmp_path):
    datamodule, module = make("deepalign", tiny_backbone, tmp_path, "module.objective=sft", "module.alpha=0.3")
    batch = first_batch(datamodule)
    safety, utility = batch["safety"], batch["utility"]
    safety_ce = module.model(
        input_ids=safety["input_ids"], attention_mask=safety["attention_mask"], labels=safety["labels"]
    ).loss
    utility_ce = module.model(**utility).loss
    assert module.reference is None  # the CE objective loads no reference
    assert module(batch).item() == pytest.approx(0.3 * safety_ce.item() + 0.7 * utility_ce.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------ TAR
def tar(tiny_backbone, tmp_path, *overrides: str):
    return make(
        "tar",
        tiny_backbone,
        tmp_path,
        "module.attack_optimizer=sgd",
        "module.attack_lrs=[0.5]",
        "module.schedule=uniform",
        *overrides,
    )


def test_tar_restores_the_weights_exactly(tiny_backbone, tmp_path):
    datamodule, module = tar(tiny_backbone, tmp_path, "module.inner_steps=3", "module.tr_every=1")
    before = copy.deepcopy(module.model.state_dict())
    held_out, attacks = module.split_harmful(first_batch(datamodule)["harmful"])
    _, diagnostics = module.tamper_resistance_gradient(attacks, held_out)
    assert diagnostics["attack_loss_last"] < diagnostics["attack_loss_first"]  # the attack did move the weights
    after = module.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(p.grad is None for p in module.model.parameters())


def test_tar_meta_gradient_is_the_gradient_at_the_attacked_weights(tiny_backbone, tmp_path):
    datamodule, module = tar(tiny_backbone, tmp_path, "module.inner_steps=3", "module.tr_every=100")
    held_out, attacks = module.split_harmful(first_batch(datamodule)["harmful"])
    meta_gradient, _ = module.tamper_resistance_gradient(attacks, held_out)

    # Independently: three SGD steps on a copy, then the TR loss's gradient there (first order).
    attacked = copy.deepcopy(module)
    sgd = torch.optim.SGD(attacked.model.parameters(), lr=0.5)
    for step in range(3):
        sgd.zero_grad()
        attacked.model(**attacks[step % len(attacks)]).loss.backward()
        sgd.step()
    expected = grads_of(attacked.tamper_resistance_loss(held_out), attacked.model)
    assert all_close(meta_gradient, expected, rtol=1e-4, atol=1e-6)
    at_start = grads_of(module.tamper_resistance_loss(held_out), module.model)
    assert not all_close(meta_gradient, at_start, rtol=1e-2)


def test_tar_without_inner_steps_is_the_plain_loss_gradient(tiny_backbone, tmp_path):
    for loss in ("max_entropy", "neg_ce"):
        datamodule, module = tar(tiny_backbone, tmp_path / loss, "module.inner_steps=0", f"module.tr_loss={loss}")
        held_out, attacks = module.split_harmful(first_batch(datamodule)["harmful"])
        meta_gradient, _ = module.tamper_resistance_gradient(attacks, held_out)
        assert all_close(meta_gradient, grads_of(module.tamper_resistance_loss(held_out), module.model), atol=1e-7)
    assert module.evaluation_weights() == {0: 1.0}


class KeepBatch(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.batch = batch


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_tar_step_applies_retain_plus_weighted_meta_gradient(tiny_backbone, tmp_path, clip):
    datamodule, module = tar(
        tiny_backbone,
        tmp_path,
        "module.inner_steps=2",
        "module.tr_every=100",
        "module.tr_weight=3.0",
        "module.representation_weight=0.0",
    )
    module.optimizer_factory = lambda params: torch.optim.SGD(params, lr=0.1)
    module.scheduler_factory = None
    initial = copy.deepcopy(module)
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

    held_out, attacks = initial.split_harmful(keep.batch["harmful"])
    meta_gradient, _ = initial.tamper_resistance_gradient(attacks, held_out)
    retain = grads_of(initial.retain_loss(keep.batch["retain"])["retain_loss"], initial.model)
    update = [r + 3.0 * m for r, m in zip(retain, meta_gradient)]
    if clip:  # the trainer's gradient_clip_val is honoured (total norm)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(u) for u in update]))
        assert norm > clip
        update = [u * clip / norm for u in update]
    moved = [(p0 - p1) / 0.1 for p0, p1 in zip(initial.model.parameters(), module.model.parameters())]
    assert all_close(moved, update, rtol=1e-3, atol=1e-6)


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize(
    "defense, overrides, metric",
    [
        ("simpo", [], "train/reward_margin"),
        ("deepalign", [], "train/safety_loss"),
        ("tar", ["module.inner_steps=4"], "train/tr_loss"),
    ],
)
def test_defense_trains_and_saves_a_loadable_model(tiny_train_config, tiny_backbone, defense, overrides, metric):
    cfg = tiny_train_config(f"defense={defense}", "trainer.max_steps=4", "sample_prompts=null", *overrides)
    summary = train(cfg)
    assert summary["global_step"] == 4
    values = [float(r[metric]) for r in logged(Path(cfg.paths.output_dir)) if r.get(metric)]
    assert len(values) == 4 and all(math.isfinite(v) for v in values)

    trained = AutoModelForCausalLM.from_pretrained(summary["model_dir"])
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert not torch.allclose(trained(ids).logits, tiny_backbone.load_model()(ids).logits)
