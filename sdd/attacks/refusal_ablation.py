"""Refusal-direction ablation: a weight edit that removes the model's refusal direction.

Arditi, Obeso, Syed, Paleka, Panickssery, Gurnee and Nanda (2024), "Refusal in Language Models Is
Mediated by a Single Direction" (arXiv:2406.11717; NeurIPS 2024), §2-§4 and appendix C.

The procedure, as the paper describes it:

1. **Candidates.** For every layer l and post-instruction position i, the difference of means of the
   residual-stream activations ``x_i^(l)`` (the input of decoder layer l) over harmful and harmless
   prompts: ``r_i^(l) = mean_harmful - mean_harmless``, normalised.
2. **Selection** on held-out prompts (not those of step 1, not the evaluation's): each candidate is
   ablated, ``x <- x - r r^T x`` for every activation that is written to the residual stream, and the one
   that best removes refusals from harmful prompts is kept, among those that change the next-token
   distribution of harmless prompts little (KL < 0.1) and lie below 0.8 L.
3. **Weight orthogonalisation.** ``W <- W - r r^T W`` for every matrix that writes to the residual
   stream (the token embedding's rows, each layer's attention output and MLP down projection, and
   their biases), so the saved model computes what the ablation hooks computed, with no hooks.

What we interpreted or chose:

- *Positions*: the paper's are the tokens of the chat template after the instruction (``positions:
  auto``, counted by rendering a prompt through :mod:`sdd.chat`, the one chat path); ``positions: N``
  takes the last N tokens of the rendered prompt (default 1, the last one, so that a CPU run scores
  one candidate per layer). Prompts are rendered as one user turn with the generation prompt, as :mod:`sdd.generation`
  sends them.
- *Refusal measure*: the paper scores a candidate by the log-odds of hand-picked refusal tokens at the
  first generated position; we generate ``max_new_tokens`` greedy tokens per held-out harmful prompt
  (:func:`sdd.generation.generate`) and take the refusal-keyword rate of
  :class:`sdd.evaluation.judges.RefusalKeywordJudge` (a proxy, labelled so in the record). Ties (e.g.
  several candidates at 0%) are broken by the harmless KL, lower first.
- *Filters*: the layer range (``min/max_layer_fraction``) and the KL filter (mean KL(original ||
  ablated) of the last position's next-token distribution on held-out harmless prompts, ``max_kl``);
  when no candidate passes the KL filter the best of all is taken, with a warning, and the record says
  so. The paper's third filter (adding the direction must induce refusal on harmless prompts) is not
  applied. Candidates whose difference of means is zero (the embedding layer: the post-instruction
  tokens are the same template tokens for every prompt) are skipped.
- *Hooks = weights*: the selection ablates by forward hooks on exactly the modules whose weights are
  orthogonalised afterwards (the embedding and each layer's writers), so the chosen candidate's scores
  are those of the saved model.
- *Tied embeddings*: when the unembedding shares the embedding matrix (tiny_llama, SmolLM2),
  orthogonalising the embedding would also change the unembedding, which the ablation leaves alone
  (it acts on the residual stream only). With ``untie_embeddings: true`` (default) the head gets its own
  copy of the original matrix and the config is untied, so the saved model equals the hooked one
  (the folder grows by one vocabulary x hidden matrix); ``false`` orthogonalises the shared matrix, as
  the authors did for Gemma, which also removes ``r`` from what the head reads.
- *Layouts*: the writers of each decoder layer are module paths per ``model_type``
  (``weight_edit.layouts``: Llama, Mistral, Qwen2/3, Gemma, Phi-3 by ``o_proj``/``down_proj``; Phi-2,
  ChatGLM3 by their own names) or ``weight_edit.layout`` for any other backbone. The embedding is
  ``get_input_embeddings()`` and the layers are the shared decoder-layer lookup unless declared.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from sdd.chat import render, tokenize_prompt, user_turn
from sdd.errors import ConfigError, require_device

log = logging.getLogger(__name__)

RECORD_FILE = "refusal_ablation.json"
DIRECTION_FILE = "refusal_direction.pt"
_PROBE_INSTRUCTION = "Describe the probe object in one word."


# ------------------------------------------------------------------------------------------------ layout
@dataclass
class ResidualLayout:
    """The modules that write to a model's residual stream.

    Attributes:
        embed: the token embedding (its output is the stream's start).
        layers: the decoder layers; their inputs are the residual-stream activations.
        writers: per layer, the modules whose outputs are added to the stream (attention out, MLP out).
        sequence_first: hidden states are ``[sequence, batch, hidden]`` (ChatGLM) instead of batch first.
    """

    embed: torch.nn.Module
    layers: Sequence[torch.nn.Module]
    writers: list[list[torch.nn.Module]]
    sequence_first: bool = False

    def all_writers(self) -> list[torch.nn.Module]:
        return [self.embed, *(module for modules in self.writers for module in modules)]


def resolve_layout(
    model: torch.nn.Module, layout: Mapping[str, Any] | None, layouts: Mapping[str, Mapping[str, Any]]
) -> ResidualLayout:
    """The residual-stream writers of ``model``: ``layout`` if given, else ``layouts[model_type]``.

    Raises:
        ConfigError: no layout is declared for the model's type, or a declared path does not exist.
    """
    model_type = getattr(model.config, "model_type", None)
    spec = dict(layout) if layout else dict(layouts.get(model_type) or {})
    if not spec.get("writers"):
        raise ConfigError(
            f"Refusal ablation does not know where layers of model_type '{model_type}' write to the residual "
            f"stream (declared: {sorted(layouts)}). Fix: weight_edit.layout={{writers: [<attention output module>, "
            "<MLP output module>]}} with paths inside a decoder layer (e.g. [self_attn.o_proj, mlp.down_proj]); "
            "add embed: <path> and layers: <path> if the embedding or the layer list is not found."
        )
    embed = _submodule(model, spec["embed"], "embed") if spec.get("embed") else model.get_input_embeddings()
    if spec.get("layers"):
        layers = _submodule(model, spec["layers"], "layers")
    else:
        # The shared decoder-layer lookup.
        from sdd.modules.ops import decoder_layers

        layers = decoder_layers(model)
    writers = [[_submodule(layer, path, "writers") for path in spec["writers"]] for layer in layers]
    return ResidualLayout(embed, list(layers), writers, bool(spec.get("sequence_first", False)))


def _submodule(root: torch.nn.Module, path: str, key: str) -> torch.nn.Module:
    try:
        return root.get_submodule(str(path))
    except AttributeError:
        raise ConfigError(
            f"weight_edit.layout.{key}: {type(root).__name__} has no module '{path}'. Fix the path (print(model) "
            "shows the module names) in weight_edit.layout or weight_edit.layouts."
        ) from None


# ------------------------------------------------------------------------------------------------ ablation
def project_out(tensor: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``tensor`` without its component along the unit vector ``direction`` (on the last axis)."""
    unit = direction.to(device=tensor.device, dtype=tensor.dtype)
    return tensor - (tensor @ unit).unsqueeze(-1) * unit


@contextlib.contextmanager
def directional_ablation(layout: ResidualLayout, direction: torch.Tensor) -> Iterator[None]:
    """Ablate ``direction`` from every write to the residual stream (forward hooks; removed on exit)."""

    from sdd.modules.ops import forward_hooks, main_output, replace_main_output

    def hook(module, args, output):
        return replace_main_output(output, project_out(main_output(output), direction))

    with forward_hooks(dict(enumerate(layout.all_writers())), lambda index: hook):
        yield


@torch.no_grad()
def orthogonalize_weights(
    model: torch.nn.Module, layout: ResidualLayout, direction: torch.Tensor, untie_embeddings: bool = True
) -> None:
    """``W <- W - r r^T W`` for every matrix (and bias) that writes to the residual stream, in place.

    The embedding's rows are vectors in the stream (``E <- E - E r r^T``); a linear writer's output
    axis is (``W <- W - r r^T W``, ``b <- b - r r^T b``).
    """
    unit = direction.float()
    embed = layout.embed
    head = model.get_output_embeddings()
    if head is not None and head.weight is embed.weight and untie_embeddings:
        head.weight = torch.nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
        for config in {id(c): c for c in (model.config, _text_config(model.config))}.values():
            config.tie_word_embeddings = False
    embed.weight.copy_(_project_rows(embed.weight, unit))
    for module in (m for modules in layout.writers for m in modules):
        weight = module.weight  # [hidden (out), in] for nn.Linear
        if weight.shape[0] != unit.numel():
            raise ConfigError(
                f"{type(module).__name__} with weight {tuple(weight.shape)} does not write a {unit.numel()}-wide "
                "residual stream on its first axis. Fix weight_edit.layout.writers: name the modules whose output "
                "is added to the residual stream."
            )
        weight.copy_((weight.float() - torch.outer(unit, unit @ weight.float())).to(weight.dtype))
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(_project_rows(module.bias[None], unit)[0])


def _project_rows(matrix: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    return project_out(matrix.float(), unit.to(matrix.device)).to(matrix.dtype)


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


# ------------------------------------------------------------------------------------------------ activations
def post_instruction_token_count(tokenizer) -> int:
    """How many tokens the chat template puts after a user's instruction (generation prompt included)."""
    text = render(tokenizer, user_turn(_PROBE_INSTRUCTION), add_generation_prompt=True)
    head = text[: text.index(_PROBE_INSTRUCTION) + len(_PROBE_INSTRUCTION)]
    total = len(tokenize_prompt(tokenizer, user_turn(_PROBE_INSTRUCTION)))
    return max(1, total - len(tokenizer(head, add_special_tokens=False)["input_ids"]))


def prompt_batches(tokenizer, prompts: Sequence[str], batch_size: int, device) -> Iterator[dict[str, torch.Tensor]]:
    """Left-padded batches of chat-rendered prompts (so the post-instruction tokens end every row)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(prompts), batch_size):
        ids = [tokenize_prompt(tokenizer, user_turn(p)) for p in prompts[start : start + batch_size]]
        width = max(len(row) for row in ids)
        input_ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in ids], device=device)
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        yield {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}


@torch.no_grad()
def mean_activations(
    model, layout: ResidualLayout, tokenizer, prompts: Sequence[str], num_positions: int, batch_size: int
) -> torch.Tensor:
    """Mean residual-stream activation ``[layer, position, hidden]`` (float32) over ``prompts``: the input
    of each decoder layer at the last ``num_positions`` tokens of each rendered prompt."""
    captured: dict[int, torch.Tensor] = {}

    def capture(index):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            hidden = hidden.transpose(0, 1) if layout.sequence_first else hidden
            captured[index] = hidden[:, -num_positions:].float().sum(0)

        return hook

    device = next(model.parameters()).device
    total = None
    handles = [layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in enumerate(layout.layers)]
    try:
        for batch in prompt_batches(tokenizer, prompts, batch_size, device):
            model(**batch, use_cache=False)
            stacked = torch.stack([captured[i] for i in range(len(layout.layers))])
            total = stacked if total is None else total + stacked
    finally:
        for handle in handles:
            handle.remove()
    return total / len(prompts)


@torch.no_grad()
def last_position_log_probs(model, tokenizer, prompts: Sequence[str], batch_size: int) -> torch.Tensor:
    """Log-probabilities of the first answer token, ``[prompt, vocabulary]`` (float32)."""
    device = next(model.parameters()).device
    rows = [
        torch.log_softmax(model(**batch, use_cache=False).logits[:, -1].float(), dim=-1)
        for batch in prompt_batches(tokenizer, prompts, batch_size, device)
    ]
    return torch.cat(rows)


def refusal_rate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int) -> float:
    """Percentage of greedy answers the refusal-keyword judge (a proxy) counts as refusals."""
    from sdd.evaluation.judges import RefusalKeywordJudge
    from sdd.generation import generate

    answers = generate(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size)
    judge = RefusalKeywordJudge()
    return judge.summarize(judge.judge(prompts, answers))["refusal_rate"]


def mean_kl(reference: torch.Tensor, log_probs: torch.Tensor) -> float:
    """Mean KL(reference || other) over rows of log-probabilities."""
    return float((reference.exp() * (reference - log_probs)).sum(-1).mean())


# ------------------------------------------------------------------------------------------------ the attack
class RefusalDirectionAblation:
    """Find, choose and project out the refusal direction of a model (``attack_kind: weight_edit``).

    Args mirror ``weight_edit`` in ``conf/attack/refusal_ablation.yaml``:
        harmful, harmless: data sources of instructions (column ``instruction``).
        num_direction_prompts, num_selection_prompts: prompts per class for the means and for selection.
        positions: ``auto`` (the template's post-instruction tokens) or the number of last tokens.
        min_layer_fraction, max_layer_fraction, layer_step: candidate layers ``min*L <= l < max*L``, every
            ``layer_step``-th.
        max_new_tokens: greedy tokens judged for refusal per selection prompt.
        max_kl: the harmless-KL filter.
        batch_size: prompts per forward pass / generation batch.
        device: ``cuda``, ``cpu`` or None (cuda when available).
        untie_embeddings: give a tied head its own copy of the original matrix.
        layout, layouts: the residual-stream writers (see :func:`resolve_layout`).
    """

    def __init__(
        self,
        harmful: Mapping[str, Any],
        harmless: Mapping[str, Any],
        num_direction_prompts: int = 64,
        num_selection_prompts: int = 8,
        positions: int | str = 1,
        min_layer_fraction: float = 0.0,
        max_layer_fraction: float = 0.8,
        layer_step: int = 1,
        max_new_tokens: int = 8,
        max_kl: float = 0.1,
        batch_size: int = 16,
        device: str | None = None,
        untie_embeddings: bool = True,
        layout: Mapping[str, Any] | None = None,
        layouts: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        integers = {
            "num_direction_prompts": num_direction_prompts,
            "num_selection_prompts": num_selection_prompts,
            "layer_step": layer_step,
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
        }
        for key, value in integers.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"weight_edit.{key} must be a positive integer, got {value!r}. Fix: "
                    f"weight_edit.{key}=<integer >= 1>."
                )
        if positions != "auto" and (isinstance(positions, bool) or not isinstance(positions, int) or positions < 1):
            raise ConfigError(f"weight_edit.positions must be auto or a positive integer, got {positions!r}.")
        if not 0.0 <= min_layer_fraction < max_layer_fraction <= 1.0:
            raise ConfigError(
                f"weight_edit needs 0 <= min_layer_fraction < max_layer_fraction <= 1, got {min_layer_fraction} and "
                f"{max_layer_fraction}. Fix: weight_edit.max_layer_fraction=0.8 (the paper's)."
            )
        require_device(device, "weight_edit.device")
        self.harmful, self.harmless = dict(harmful), dict(harmless)
        self.num_direction_prompts = num_direction_prompts
        self.num_selection_prompts = num_selection_prompts
        self.positions = positions
        self.layer_range = (min_layer_fraction, max_layer_fraction)
        self.layer_step = layer_step
        self.max_new_tokens = max_new_tokens
        self.max_kl = max_kl
        self.batch_size = batch_size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.untie_embeddings = untie_embeddings
        self.layout = dict(layout) if layout else None
        self.layouts = dict(layouts or {})

    # -------------------------------------------------------------------------------------- steps
    def split_prompts(self, source: Mapping[str, Any], name: str, seed: int) -> tuple[list[str], list[str]]:
        """(direction prompts, selection prompts) of a source: shuffled, selection first, disjoint."""
        from sdd.data.sources import load_records

        texts = list(dict.fromkeys(str(r["instruction"]) for r in load_records(source, name, ["instruction"])))
        random.Random(seed).shuffle(texts)
        selection_count = self.num_selection_prompts
        if len(texts) < selection_count + 2:
            raise ConfigError(
                f"{name}: {len(texts)} distinct instructions, fewer than weight_edit.num_selection_prompts="
                f"{selection_count} plus 2 for the direction. Fix: a larger source, or lower num_selection_prompts."
            )
        selection, rest = texts[:selection_count], texts[selection_count:]
        if len(rest) < self.num_direction_prompts:
            log.warning(
                "%s: %d instructions left for the direction (weight_edit.num_direction_prompts=%d)",
                name,
                len(rest),
                self.num_direction_prompts,
            )
        return rest[: self.num_direction_prompts], selection

    def candidate_layers(self, num_layers: int) -> range:
        """Layers ``min*L <= l < max*L``, every ``layer_step``-th."""
        low, high = self.layer_range
        start = math.floor(low * num_layers)
        return range(start, max(start + 1, math.ceil(high * num_layers)), self.layer_step)

    def select(
        self,
        model,
        tokenizer,
        layout: ResidualLayout,
        directions: torch.Tensor,
        norms: torch.Tensor,
        harmful: Sequence[str],
        harmless: Sequence[str],
    ) -> dict[str, Any]:
        """Score every candidate on the selection prompts; return the chosen one and the table."""
        harmless_reference = last_position_log_probs(model, tokenizer, harmless, self.batch_size)
        scale = norms.max().clamp(min=1e-12)
        candidates = []
        grid = [
            (layer, position)
            for layer in self.candidate_layers(directions.shape[0])
            for position in range(directions.shape[1])
            if norms[layer, position] > 1e-6 * scale
        ]  # zero: identical activations (template tokens' embeddings)
        for layer, position in tqdm(grid, desc="Scoring candidate directions"):
            direction = directions[layer, position]
            with directional_ablation(layout, direction):
                rate = refusal_rate(model, tokenizer, harmful, self.max_new_tokens, self.batch_size)
                kl = mean_kl(harmless_reference, last_position_log_probs(model, tokenizer, harmless, self.batch_size))
            candidates.append(
                {
                    "layer": layer,
                    "position": position - directions.shape[1],
                    "harmful_refusal_rate": rate,
                    "harmless_kl": kl,
                    "mean_difference_norm": float(norms[layer, position]),
                }
            )
        if not candidates:
            raise ConfigError(
                "No candidate direction: every difference of means in the layer range is zero. Fix: "
                "widen weight_edit.min/max_layer_fraction, or weight_edit.positions."
            )
        passing = [c for c in candidates if c["harmless_kl"] <= self.max_kl]
        if not passing:
            log.warning("No candidate keeps the harmless KL <= weight_edit.max_kl=%s; choosing among all", self.max_kl)
        chosen = min(passing or candidates, key=lambda c: (c["harmful_refusal_rate"], c["harmless_kl"]))
        return {"chosen": chosen, "kl_filter_passed": bool(passing), "candidates": candidates}

    # -------------------------------------------------------------------------------------- run
    def run(self, cfg: DictConfig) -> dict[str, Any]:
        """Find, choose and project out the refusal direction of ``cfg.backbone``; save the edited model.

        Returns:
            ``model_dir`` (the saved transformers folder), ``global_step`` (0), ``metrics`` (the chosen
            candidate's selection scores, proxies) and ``selection`` (the record written as JSON).
        """
        from hydra.utils import instantiate

        from sdd.training import refuse_finished_run, save_model, write_config

        started = time.time()
        output_dir = Path(cfg.paths.output_dir)
        refuse_finished_run(output_dir, cfg)
        harmful_direction, harmful_selection = self.split_prompts(self.harmful, "weight_edit.harmful", cfg.seed)
        harmless_direction, harmless_selection = self.split_prompts(self.harmless, "weight_edit.harmless", cfg.seed)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_config(cfg, output_dir / "config.yaml")

        backbone = instantiate(cfg.backbone)
        tokenizer = backbone.load_tokenizer()
        model = backbone.load_model().to(self.device).eval()
        layout = resolve_layout(model, self.layout, self.layouts)
        num_positions = post_instruction_token_count(tokenizer) if self.positions == "auto" else int(self.positions)

        harmful_means = mean_activations(model, layout, tokenizer, harmful_direction, num_positions, self.batch_size)
        harmless_means = mean_activations(model, layout, tokenizer, harmless_direction, num_positions, self.batch_size)
        differences = harmful_means - harmless_means
        norms = differences.norm(dim=-1)
        directions = differences / norms.clamp(min=1e-12).unsqueeze(-1)
        layers = self.candidate_layers(directions.shape[0])
        log.info("Refusal ablation: %d layers x %d positions; candidate layers %s", *directions.shape[:2], list(layers))

        before = {
            "harmful_refusal_rate": refusal_rate(
                model, tokenizer, harmful_selection, self.max_new_tokens, self.batch_size
            ),
            "harmless_refusal_rate": refusal_rate(
                model, tokenizer, harmless_selection, self.max_new_tokens, self.batch_size
            ),
        }
        selection = self.select(model, tokenizer, layout, directions, norms, harmful_selection, harmless_selection)
        chosen = selection["chosen"]
        direction = directions[chosen["layer"], chosen["position"]].clone()
        orthogonalize_weights(model, layout, direction, self.untie_embeddings)
        after = {
            "harmful_refusal_rate": chosen["harmful_refusal_rate"],
            "harmless_refusal_rate": refusal_rate(
                model, tokenizer, harmless_selection, self.max_new_tokens, self.batch_size
            ),
            "harmless_kl": chosen["harmless_kl"],
        }

        model_dir = output_dir / "model"
        save_model(model.cpu(), tokenizer, model_dir)
        torch.save(
            {"direction": direction.cpu(), "layer": chosen["layer"], "position": chosen["position"]},
            output_dir / DIRECTION_FILE,
        )
        record = {
            "method": "refusal-direction ablation (Arditi et al. 2024), weight orthogonalisation",
            "model_dir": str(model_dir),
            "layer": chosen["layer"],
            "position": chosen["position"],
            "num_layers": directions.shape[0],
            "post_instruction_positions": num_positions,
            "candidate_layers": list(layers),
            "refusal_judge": "refusal keyword (proxy)",
            "max_new_tokens": self.max_new_tokens,
            "max_kl": self.max_kl,
            "kl_filter_passed": selection["kl_filter_passed"],
            "prompts": {
                "harmful_direction": len(harmful_direction),
                "harmless_direction": len(harmless_direction),
                "harmful_selection": len(harmful_selection),
                "harmless_selection": len(harmless_selection),
            },
            "before": before,
            "after": after,
            "untied_embeddings": bool(self.untie_embeddings),
            "seconds": round(time.time() - started, 1),
            "candidates": selection["candidates"],
        }
        (output_dir / RECORD_FILE).write_text(json.dumps(record, indent=2))
        metrics = {f"selection/{k}_before": float(v) for k, v in before.items()}
        metrics.update({f"selection/{k}_after": float(v) for k, v in after.items()})
        summary = {
            "model_dir": str(model_dir),
            "global_step": 0,
            "metrics": metrics,
            "selection": {k: v for k, v in record.items() if k != "candidates"},
        }
        if cfg.get("sample_prompts"):
            from sdd.generation import generate

            answers = generate(model, tokenizer, list(cfg.sample_prompts), cfg.sample_max_new_tokens)
            summary["samples"] = [{"prompt": p, "answer": a} for p, a in zip(cfg.sample_prompts, answers)]
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        log.info(
            "Refusal direction: layer %d, position %d; harmful refusal rate %.1f%% -> %.1f%% (proxy)",
            chosen["layer"],
            chosen["position"],
            before["harmful_refusal_rate"],
            after["harmful_refusal_rate"],
        )
        return summary
