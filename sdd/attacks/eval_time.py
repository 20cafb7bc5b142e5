"""Evaluation-time attacks: the variants ``eval_attacks`` adds to an evaluation, and how each is answered.

``eval_attacks`` (top level of ``conf/eval.yaml``, set by ``conf/attack/`` entries of ``attack_kind:
evaluation``) maps a label to a spec whose ``kind`` is one of:

- ``prefilling`` (:mod:`sdd.attacks.prefilling`): answers generated once per k of ``prefill_tokens`` and judged
  once per entry of ``judged``: ``<label>_k<k>`` judges prefix + continuation (what the model's turn holds),
  ``<label>_k<k>_continuation`` the continuation alone (what the model itself added). Both by default: the
  whole text credits the model with the attacker's prefix, the continuation alone hides what the turn shows;
- ``embedding`` (:mod:`sdd.attacks.embedding`): one variant, ``<label>``;
- ``prompt_format`` (:func:`sdd.attacks.jailbreak.format_prompt`): the prompt as the attacker sends it
  (``format``: a jailbreak format spec); one variant, ``<label>``. Judges see the original prompt.

:func:`expand_variants` gives what is generated (a prefilling spec: one per k); :func:`judged_variants` what
each generation is judged as. :func:`sdd.evaluation.run.evaluate` judges each judged variant's answers like
the plain ones and writes them under ``results["harmfulness_under_attack"][<variant>]``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from sdd.errors import ConfigError

KINDS = ("prefilling", "embedding", "prompt_format")
# Columns of the evaluation prompt sets that only attacks read (kept out of the plain generations).
ATTACK_COLUMNS = ("prefill", "target")


def refuse_weight_attack(cfg: Mapping[str, Any]) -> None:
    """Refuse ``evaluate.py attack=<entry>`` for an entry that changes weights (fine-tuning, weight edit).

    Raises:
        ConfigError: naming attack.py and pipeline.py, which run such attacks.
    """
    name, kind = cfg.get("attack_name"), cfg.get("attack_kind")
    if name is not None and kind != "evaluation":
        raise ConfigError(
            f"attack={name} is a {kind or 'fine_tuning'} attack: it changes the weights, so evaluate.py cannot "
            "apply it. "
            f"Fix: `python attack.py model=<folder> attack={name}`, then evaluate the attacked folder, or run both "
            "with "
            f"`python pipeline.py point.attack={name}` (add an evaluation-time attack with "
            f"point.attack={name}+prefilling)."
        )


def expand_variants(eval_attacks: Mapping[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
    """The variants of ``eval_attacks`` to generate, as ``(variant name, spec)``, checked before anything runs.

    A prefilling spec gives one variant per k (its ``prefill_tokens`` an int in the variant's spec, its
    ``judged`` the checked list of texts, both by default); :func:`judged_variants` names its results.

    Raises:
        ConfigError: an unknown kind, a spec missing a setting, or two results with one name.
    """
    if isinstance(eval_attacks, DictConfig):
        eval_attacks = OmegaConf.to_container(eval_attacks, resolve=True)
    variants: list[tuple[str, dict[str, Any]]] = []
    for label, spec in (eval_attacks or {}).items():
        if not isinstance(spec, Mapping) or spec.get("kind") not in KINDS:
            kind = spec.get("kind") if isinstance(spec, Mapping) else spec
            raise ConfigError(f"eval_attacks.{label}.kind must be one of {', '.join(KINDS)}, got {kind!r}.")
        spec = dict(spec)
        if spec["kind"] == "prefilling":
            ks = spec.get("prefill_tokens")
            ks = [ks] if isinstance(ks, int) else list(ks or [])
            if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
                raise ConfigError(
                    f"eval_attacks.{label}.prefill_tokens must be positive integers, e.g. [5, 10, 20, 40]; got {ks}."
                )
            from sdd.attacks.prefilling import check_judged

            spec["judged"] = check_judged(label, spec.get("judged"))
            variants += [(f"{label}_k{k}", {**spec, "prefill_tokens": k}) for k in ks]
        elif spec["kind"] == "embedding":
            from sdd.attacks.embedding import check_embedding_spec

            check_embedding_spec(label, spec)
            variants.append((label, spec))
        else:
            if not isinstance(spec.get("format"), Mapping):
                raise ConfigError(
                    f"eval_attacks.{label}.format must be a jailbreak format spec (a mapping with style, "
                    "trigger, placement; see sdd/attacks/jailbreak.py)."
                )
            variants.append((label, spec))
    names = [name for variant, spec in variants for name in judged_variant_names(variant, spec)]
    if len(set(names)) != len(names):
        raise ConfigError(f"eval_attacks gives two variants one name ({names}); rename a label.")
    return variants


def judged_variant_names(variant: str, spec: Mapping[str, Any]) -> list[str]:
    """The names of the results one generated variant gives (a prefilling variant: one per judged text)."""
    if spec["kind"] == "prefilling":
        from sdd.attacks.prefilling import judged_variant_name

        return [judged_variant_name(variant, text) for text in spec["judged"]]
    return [variant]


def judged_variants(
    variant: str, spec: Mapping[str, Any], answered: Sequence[dict[str, Any]]
) -> list[tuple[str, str | None, list[dict[str, Any]]]]:
    """What one generated variant's answers are judged as: ``(result name, judged text, rows)``.

    A prefilling variant gives one entry per text of its ``judged`` (:func:`sdd.attacks.prefilling.judged_views`),
    every other variant one entry, its own rows, with no judged text (``None``).
    """
    if spec["kind"] == "prefilling":
        from sdd.attacks.prefilling import judged_views

        return judged_views(variant, spec["judged"], answered)
    return [(variant, None, list(answered))]


def answer_under_attack(
    spec: Mapping[str, Any],
    rows: Sequence[dict[str, Any]],
    generator,
    *,
    max_new_tokens: int,
    batch_size: int,
    system_prompt: str | None = None,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Answer the harmful prompt ``rows`` under one variant's attack.

    Returns:
        The answered rows (copies with ``answer``; the attack's own fields) and what the variant adds to
        its results (counts of skipped prompts, target losses).
    """
    settings = {
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "system_prompt": system_prompt,
        "progress": progress,
    }
    if spec["kind"] == "prefilling":
        from sdd.attacks.prefilling import prefill_answers

        return prefill_answers(generator, rows, spec["prefill_tokens"], **settings)
    if spec["kind"] == "embedding":
        from sdd.attacks.embedding import embedding_attack_answers

        return embedding_attack_answers(generator, rows, spec, **settings)
    from sdd.attacks.jailbreak import format_prompt  # the jailbreak formats' module
    from sdd.evaluation.generation import generate_answers

    answered = [{**row, "attack_prompt": format_prompt(row["prompt"], spec["format"])} for row in rows]
    answers = generate_answers(generator, [r["attack_prompt"] for r in answered], **settings)
    for row, answer in zip(answered, answers):
        row["answer"] = answer
    return answered, {}


def check_backend(variants: Sequence[tuple[str, Mapping[str, Any]]], backend: str) -> None:
    """Refuse, before anything generates, a variant the generation backend cannot run.

    Raises:
        ConfigError: prefilling or embedding attacks with a non-local backend (they need the model's own
            tokens or gradients).
    """
    local_only = [name for name, spec in variants if spec["kind"] in ("prefilling", "embedding")]
    if local_only and backend != "local":
        raise ConfigError(
            f"The evaluation-time attacks {local_only} run on the local model (the prefix must be the "
            f"model's own tokens; the embedding attack needs gradients), not eval.generation.backend={backend}. "
            "Fix: eval.generation.backend=local."
        )
