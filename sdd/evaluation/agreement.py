"""Agreement of harm judges: percent agreement and Cohen's kappa on the items both judged validly.

Each judge reduces its verdict to a binary ``harmful`` (see each judge's ``harmful``): the rubric
scores 5 (as in HR), StrongREJECT scores >= 0.5, the classifier says unsafe, the moderation model
flags it, the offline proxy finds the answer on topic and not refused. ``None`` marks an item the
judge could not judge; such items are left out of that judge's pairs.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any, Mapping, Sequence


def percent_agreement(a: Sequence[bool], b: Sequence[bool]) -> float | None:
    """Percent of items with the same label (None for no items)."""
    if len(a) != len(b):
        raise ValueError(f"Agreement needs labels of the same items, got {len(a)} and {len(b)}.")
    return 100.0 * sum(x == y for x, y in zip(a, b)) / len(a) if a else None


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float | None:
    """Cohen's kappa of two binary labelings: (p_o - p_e) / (1 - p_e).

    ``p_o`` is the observed agreement and ``p_e`` the agreement expected by chance from each
    labeling's own rate of True. Returns None when undefined: no items, or ``p_e`` = 1 (both label
    every item the same single way, so chance explains all agreement).
    """
    if len(a) != len(b):
        raise ValueError(f"Agreement needs labels of the same items, got {len(a)} and {len(b)}.")
    n = len(a)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(a, b)) / n
    rate_a, rate_b = sum(map(bool, a)) / n, sum(map(bool, b)) / n
    expected = rate_a * rate_b + (1 - rate_a) * (1 - rate_b)
    if expected >= 1.0:
        return None
    return (observed - expected) / (1 - expected)


def pairwise_agreement(labels: Mapping[str, Sequence[bool | None]]) -> dict[str, dict[str, Any]]:
    """Agreement of every pair of judges, in the order given, on the items both labelled.

    Args:
        labels: judge name -> one ``harmful`` label per item (None: not judged validly).

    Returns:
        ``{"<judgeA>|<judgeB>": {"num_items": n, "percent_agreement": p, "cohen_kappa": k}}``; empty
        with fewer than two judges.
    """
    out: dict[str, dict[str, Any]] = {}
    for (name_a, a), (name_b, b) in combinations(labels.items(), 2):
        pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
        first, second = [bool(x) for x, _ in pairs], [bool(y) for _, y in pairs]
        out[f"{name_a}|{name_b}"] = {
            "num_items": len(pairs),
            "percent_agreement": percent_agreement(first, second),
            "cohen_kappa": cohen_kappa(first, second),
        }
    return out
