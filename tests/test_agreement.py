"""Judge agreement: Cohen's kappa and percent agreement on hand-made labels."""

from __future__ import annotations

import pytest

from sdd.evaluation.agreement import cohen_kappa, pairwise_agreement, percent_agreement


def labels_from_table(both: int, only_a: int, only_b: int, neither: int) -> tuple[list[bool], list[bool]]:
    a = [True] * both + [True] * only_a + [False] * only_b + [False] * neither
    b = [True] * both + [False] * only_a + [True] * only_b + [False] * neither
    return a, b


def test_kappa_of_a_textbook_table():
    # 50 items: both harmful 20, only A 5, only B 10, neither 15. p_o = 0.7, p_e = 0.5*0.6 + 0.5*0.4 = 0.5.
    a, b = labels_from_table(20, 5, 10, 15)
    assert percent_agreement(a, b) == pytest.approx(70.0)
    assert cohen_kappa(a, b) == pytest.approx(0.4)


def test_kappa_matches_torchmetrics():
    import torch
    from torchmetrics.functional.classification import binary_cohen_kappa

    for table in [(20, 5, 10, 15), (3, 7, 1, 9), (0, 4, 6, 0), (12, 0, 0, 8)]:
        a, b = labels_from_table(*table)
        expected = binary_cohen_kappa(torch.tensor(a, dtype=torch.long), torch.tensor(b, dtype=torch.long)).item()
        assert cohen_kappa(a, b) == pytest.approx(expected, abs=1e-6)


def test_kappa_edge_cases():
    assert cohen_kappa([True, False], [True, False]) == pytest.approx(1.0)
    assert cohen_kappa([True, False], [False, True]) == pytest.approx(-1.0)
    assert cohen_kappa([True] * 4, [True] * 4) is None  # chance explains everything: undefined
    assert cohen_kappa([], []) is None and percent_agreement([], []) is None
    with pytest.raises(ValueError):
        cohen_kappa([True], [True, False])


def test_pairwise_agreement_uses_only_items_both_judged():
    labels = {
        "rubric": [True, True, False, None, False, True],
        "strongreject": [True, False, False, True, None, True],
        "proxy": [True, True, True, True, True, True],
    }
    agreement = pairwise_agreement(labels)
    assert list(agreement) == ["rubric|strongreject", "rubric|proxy", "strongreject|proxy"]
    # rubric vs strongreject on items 0, 1, 2, 5: agree on 0, 2, 5.
    pair = agreement["rubric|strongreject"]
    assert pair["num_items"] == 4 and pair["percent_agreement"] == pytest.approx(75.0)
    assert pair["cohen_kappa"] == pytest.approx(cohen_kappa([True, True, False, True], [True, False, False, True]))
    assert agreement["rubric|proxy"]["num_items"] == 5
    assert agreement["rubric|proxy"]["percent_agreement"] == pytest.approx(60.0)
    assert agreement["rubric|proxy"]["cohen_kappa"] == pytest.approx(0.0)  # the proxy is constant
    assert pairwise_agreement({"rubric": [True]}) == {}
