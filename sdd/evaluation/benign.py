"""Benign behaviour: are benign prompts still answered as before? (SDD's central claim.)

For each benign prompt set (``eval.benign.prompt_sets``, default ``corpus.benign_eval``: columns
``prompt``, optional ``reference`` and ``input``) the model answers greedily through the evaluation's
generation backend (:func:`sdd.evaluation.generation.generate_answers`: the local model, or an
OpenAI-compatible server), and three numbers are reported per set and overall:

- ``on_topic_rate``: % of answers whose relevance-judge similarity to the prompt is above the judge's
  threshold. A proxy (an embedding's topicality, not the answer's quality).
- ``refusal_rate``: % of answers with a refusal phrase in their opening (the refusal judge): over-refusal.
  A proxy (keywords).
- ``reference_nll``: the mean negative log-likelihood (nats per token) of the reference answers under
  the model, teacher-forced, over answer tokens only: the conversation is rendered and masked by
  :mod:`sdd.chat` exactly as training data are, so the tokens scored are the answer and the template's
  end-of-turn marker. Pooled over tokens (total NLL / total answer tokens). Not a proxy: the model's
  own likelihood, a capability signal that still moves at 135M parameters where MMLU sits at chance.

The relevance and refusal judges are the ones configured under ``eval.judges`` (built once in
:func:`sdd.evaluation.run.evaluate`); a disabled judge's metric is left out and ``metrics_by`` says why.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from sdd.chat import PadCollator, instruction_answer, tokenize_conversation
from sdd.data.sources import load_records
from sdd.evaluation.generation import AnswerGenerator, LocalGenerator, generate_answers
from sdd.losses import answer_logprobs

log = logging.getLogger(__name__)

GENERATIONS_FILE = "benign_generations.jsonl"


def load_benign_sets(prompt_sets: Mapping[str, Any] | None, max_per_set: int | None) -> list[dict[str, Any]]:
    """Benign prompts (with their reference answers when the source maps ``reference``).

    An ``input`` column, when mapped and non-empty, is appended to the prompt after a blank line
    (Alpaca's instruction + input layout). ``instruction`` keeps the bare prompt text, the text that
    the data partition and the overlap check compare.
    """
    rows: list[dict[str, Any]] = []
    for set_name, source in (prompt_sets or {}).items():
        if source is None:
            continue
        records = load_records(source, name=f"corpus.benign_eval.{set_name}", required=["prompt"])
        if max_per_set is not None:
            records = records[:max_per_set]
        for record in records:
            instruction = str(record["prompt"])
            extra = record.get("input")
            reference = record.get("reference")
            rows.append(
                {
                    "kind": "benign",
                    "prompt_set": set_name,
                    "instruction": instruction,
                    "prompt": instruction + (f"\n\n{extra}" if extra not in (None, "") else ""),
                    "reference": str(reference) if reference not in (None, "") else None,
                }
            )
    return rows


@torch.no_grad()
def answer_nll(
    model,
    tokenizer,
    conversations: Sequence[Sequence[Mapping[str, str]]],
    batch_size: int = 4,
    max_length: int = 1024,
    progress: bool = False,
) -> list[tuple[float, int]]:
    """Summed NLL (nats) of each conversation's answer tokens and how many there are, teacher-forced.

    Tokens and labels come from :func:`sdd.chat.tokenize_conversation` (the training path), so only
    assistant tokens are scored; batches are right-padded and ordered by length.

    Returns:
        ``(sum of -log p over answer tokens, number of answer tokens)`` per conversation, in order;
        ``(0.0, 0)`` for a conversation whose answer lies beyond ``max_length``.
    """
    examples = [tokenize_conversation(tokenizer, c, max_length) for c in conversations]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = PadCollator(pad_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    for start in tqdm(range(0, len(order), batch_size), desc="Reference NLL", disable=not progress):
        indices = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in indices]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps, mask = answer_logprobs(logits, batch["labels"])
        sums, counts = (-logps * mask).sum(-1).tolist(), mask.sum(-1).tolist()
        for row, index in enumerate(indices):
            results[index] = (float(sums[row]), int(counts[row]))
    model.train(was_training)
    return results


def evaluate_benign(
    model,
    tokenizer,
    config: Mapping[str, Any],
    judges: Mapping[str, Any],
    output_dir: Path,
    judge_configs: Mapping[str, Any] | None = None,
    generator: AnswerGenerator | None = None,
) -> dict[str, Any]:
    """Answer the benign prompt sets, judge the answers, score the references; write the generations.

    Args:
        model: the evaluated model, for the reference NLL (and the answers when ``generator`` is None);
            None only when the reference NLL is disabled and ``generator`` is given.
        config: the ``eval.benign`` node.
        judges: the evaluation's judges by name; ``refusal`` and ``relevance`` are used when present.
        output_dir: ``benign_generations.jsonl`` is written there.
        judge_configs: the ``eval.judges`` node, to describe what produced each metric.
        generator: the evaluation's generation backend (:mod:`sdd.evaluation.generation`); None: the local model.

    Returns:
        ``{"overall", "per_prompt_set", "metrics_by"}``, or ``{"skipped": reason}`` when no benign
        prompt set is configured.
    """
    rows = load_benign_sets(config.get("prompt_sets"), config.get("max_prompts_per_set"))
    if not rows:
        reason = (
            "no benign prompt set: eval.benign.prompt_sets is empty (the corpus has no benign_eval); "
            "set eval.benign.prompt_sets.<name>={path: ..., columns: {prompt: ..., reference: ...}}"
        )
        log.warning("Benign evaluation skipped: %s", reason)
        return {"skipped": reason}
    answers = generate_answers(
        generator or LocalGenerator(model, tokenizer),
        [r["prompt"] for r in rows],
        max_new_tokens=config.get("max_new_tokens", 256),
        batch_size=config.get("batch_size", 16),
        system_prompt=config.get("system_prompt"),
        progress=True,
    )
    for row, answer in zip(rows, answers):
        row["answer"] = answer
    _write_jsonl(output_dir / GENERATIONS_FILE, rows)  # kept even if a judge fails below

    used = {name: judges[name] for name in ("refusal", "relevance") if name in judges}
    prompts = [r["prompt"] for r in rows]
    for name, judge in used.items():
        for row, verdict in zip(rows, judge.judge(prompts, answers)):
            row.setdefault("verdicts", {})[name] = verdict

    nll_config = config.get("reference_nll") or {}
    score_references = nll_config.get("enabled", True)
    if score_references:
        scored = [r for r in rows if r["reference"] is not None]
        conversations = [instruction_answer(r["prompt"], r["reference"], config.get("system_prompt")) for r in scored]
        nlls = answer_nll(
            model,
            tokenizer,
            conversations,
            batch_size=nll_config.get("batch_size", 4),
            max_length=nll_config.get("max_length", 1024),
            progress=True,
        )
        for row, (total, count) in zip(scored, nlls):
            row["reference_tokens"] = count
            row["reference_nll"] = total / count if count else None
    _write_jsonl(output_dir / GENERATIONS_FILE, rows)

    by_set: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_set[row["prompt_set"]].append(row)
    return {
        "overall": benign_metrics(rows, used, score_references),
        "per_prompt_set": {
            name: benign_metrics(subset, used, score_references) for name, subset in sorted(by_set.items())
        },
        "metrics_by": describe_metrics(used, judge_configs or {}, score_references),
    }


def benign_metrics(
    rows: Sequence[Mapping[str, Any]], judges: Mapping[str, Any], score_references: bool
) -> dict[str, Any]:
    """Rates (in %) and the pooled reference NLL of ``rows`` (answered, judged and scored)."""
    n = len(rows)
    out: dict[str, Any] = {"num_prompts": n}
    if "relevance" in judges:
        on_topic = [not r["verdicts"]["relevance"]["irrelevant"] for r in rows]
        out["on_topic_rate"] = 100.0 * sum(on_topic) / max(n, 1)
        out["mean_relevance"] = sum(r["verdicts"]["relevance"]["relevance"] for r in rows) / max(n, 1)
    if "refusal" in judges:
        out["refusal_rate"] = 100.0 * sum(bool(r["verdicts"]["refusal"]["refusal"]) for r in rows) / max(n, 1)
    if score_references:
        scored = [r for r in rows if r.get("reference_tokens")]
        tokens = sum(r["reference_tokens"] for r in scored)
        total = math.fsum(r["reference_nll"] * r["reference_tokens"] for r in scored)
        out["reference_nll"] = total / tokens if tokens else None
        out["num_references"] = len(scored)
        out["num_reference_tokens"] = tokens
    return out


def describe_metrics(
    judges: Mapping[str, Any], judge_configs: Mapping[str, Any], score_references: bool
) -> dict[str, str]:
    """What produced each benign metric: ``proxy: ...`` for the offline judges, ``model: ...`` for the NLL."""
    relevance = judge_configs.get("relevance") or {}
    refusal = judge_configs.get("refusal") or {}
    if "relevance" in judges:
        text = (
            f"proxy: relevance judge, cosine of the {relevance.get('encoder', 'encoder')} embeddings of prompt and "
            f"answer > {getattr(judges['relevance'], 'threshold', relevance.get('threshold'))}; topicality, not quality"
        )
        on_topic = mean_relevance = text
    else:
        on_topic = mean_relevance = "not computed: eval.judges.relevance.enabled=false"
    return {
        "on_topic_rate": on_topic,
        "mean_relevance": mean_relevance,
        "refusal_rate": (
            f"proxy: refusal judge, a refusal phrase in the first "
            f"{getattr(judges['refusal'], 'window', refusal.get('window'))} characters (keywords)"
        )
        if "refusal" in judges
        else "not computed: eval.judges.refusal.enabled=false",
        "reference_nll": (
            "model: mean negative log-likelihood (nats per token) of the reference answers under the "
            "evaluated model, answer tokens (and end-of-turn marker) only, pooled over tokens; not a proxy"
        )
        if score_references
        else "not computed: eval.benign.reference_nll.enabled=false",
    }


def summary_lines(benign: Mapping[str, Any] | None) -> list[str]:
    """The benign section of ``summary.md``."""
    if not benign:
        return []
    if "skipped" in benign:
        return ["## Benign behaviour", "", f"Skipped: {benign['skipped']}", ""]
    keys = [k for k in ("on_topic_rate", "refusal_rate", "reference_nll") if k in benign["overall"]]
    labels = {
        "on_topic_rate": "on-topic % (proxy)",
        "refusal_rate": "over-refusal % (proxy)",
        "reference_nll": "reference NLL",
    }
    lines = [
        "## Benign behaviour",
        "",
        "| prompt set | n | " + " | ".join(labels[k] for k in keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for name, metrics in [("**all**", benign["overall"]), *benign["per_prompt_set"].items()]:
        cells = [f"{metrics[k]:.3f}" if isinstance(metrics.get(k), float) else str(metrics.get(k)) for k in keys]
        lines.append(f"| {name} | {metrics['num_prompts']} | " + " | ".join(cells) + " |")
    return lines + [""]


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
