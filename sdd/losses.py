"""Losses on answer tokens: the one definition of the masked next-token log-probability and cross-entropy.

Every objective (SFT, the defenses, the attacks) and every evaluation that scores answers (reference
NLL, gradient separation) takes its answer-token log-probabilities from here. Labels follow
:mod:`sdd.chat`: prompt and padding positions carry ``IGNORE_INDEX``. These are functions of tensors
only, so evaluation code can use them without importing the training modules (:mod:`sdd.modules.ops`
re-exports them next to the operations on models).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdd.chat import IGNORE_INDEX


def upcast(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in at least float32 (float64 stays float64)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def answer_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log π(y_t | x, y_<t)`` of every labelled token, aligned with the causal shift.

    Args:
        logits: ``[batch, seq, vocab]`` from a causal LM.
        labels: ``[batch, seq]`` token ids, ``ignore_index`` where no loss is taken.
        ignore_index: the label of positions without a loss.

    Returns:
        ``(logps, mask)``, both ``[batch, seq - 1]``: the log-probability of token ``t + 1`` given the
        tokens up to ``t`` (0 where masked; in at least float32) and whether that position carries a label.
    """
    shifted_labels = labels[:, 1:]
    shifted_logits = upcast(logits[:, :-1])
    mask = shifted_labels != ignore_index
    # cross_entropy is the fused log_softmax + gather; ignored positions come back as 0.
    nll = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        shifted_labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="none",
    )
    return -nll.view(shifted_labels.shape), mask


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is true (0 if nothing is)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def answer_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean next-token cross-entropy over the labelled positions, in at least float32.

    Returns:
        A scalar; 0 (still attached to ``logits``, with a zero gradient) when no position is labelled.
    """
    logps, mask = answer_logprobs(logits, labels)
    return -masked_mean(logps, mask)
