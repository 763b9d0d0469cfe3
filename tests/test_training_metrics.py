"""Losses and metrics against hand computations: CMKD for both task types, accuracy, AP and mAP."""

from __future__ import annotations

import math

import pytest
import torch

from fastast.training.evaluate import accuracy, accuracy_by_group, average_precision, mean_average_precision
from fastast.training.losses import cmkd_loss, distill_loss, label_loss


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _bce(p: float, target: float) -> float:
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def _softmax(xs: list[float]) -> list[float]:
    exps = [math.exp(x) for x in xs]
    return [e / sum(exps) for e in exps]


def test_cmkd_multi_label_equals_hand_computation():
    s, t, y = [0.5, -1.0, 2.0], [2.0, 0.0, -3.0], [1.0, 0.0, 1.0]
    lam, tau = 0.1, 2.0
    lg = sum(_bce(_sigmoid(a), b) for a, b in zip(s, y)) / 3
    ld = sum(_bce(_sigmoid(a), _sigmoid(b / tau)) for a, b in zip(s, t)) / 3
    expected = lam * lg + (1 - lam) * ld
    got = cmkd_loss(torch.tensor([s]), torch.tensor([t]), torch.tensor([y]), "multi-label", lam, tau)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_cmkd_single_label_equals_hand_computation():
    s = [[1.0, 0.0, -1.0], [0.2, 0.3, 0.1]]
    t = [[3.0, 1.0, 0.0], [0.0, 2.0, 0.0]]
    y = [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    lam, tau = 0.3, 1.5
    lg = ev = 0.0
    for si, ti, yi in zip(s, t, y):
        ps, pt = _softmax(si), _softmax([v / tau for v in ti])
        lg += -math.log(ps[yi.index(1.0)])
        ev += sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt))
    expected = lam * lg / 2 + (1 - lam) * ev / 2  # both terms are batch means
    got = cmkd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), "single-label", lam, tau)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_lambda_one_is_the_label_loss_and_zero_the_teacher_loss():
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.eye(5)[:4]
    for task in ("multi-label", "single-label"):
        assert torch.allclose(cmkd_loss(s, t, y, task, 1.0, 1.0), label_loss(s, y, task))
        assert torch.allclose(cmkd_loss(s, t, y, task, 0.0, 1.0), distill_loss(s, t, task, 1.0))
    assert distill_loss(s, s, "single-label", 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_single_label_loss_takes_mixup_targets():
    logits = torch.tensor([[2.0, 0.0]])
    mixed = torch.tensor([[0.7, 0.3]])
    ls = torch.log_softmax(logits, -1)[0]
    assert label_loss(logits, mixed, "single-label").item() == pytest.approx(-(0.7 * ls[0] + 0.3 * ls[1]).item())


def test_accuracy_and_average_precision_by_hand():
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    targets = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    assert accuracy(scores, targets) == pytest.approx(1 / 3)
    # ranks 1..5, positives at 1, 3, 5: precisions 1/1, 2/3, 3/5
    ap = average_precision(torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]), torch.tensor([1, 0, 1, 0, 1]))
    assert ap == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # a tie is one threshold: {0.5, 0.5} enter together -> precision 2/3 at recall 1
    tied = average_precision(torch.tensor([0.9, 0.5, 0.5, 0.1]), torch.tensor([1, 1, 0, 0]))
    assert tied == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert math.isnan(average_precision(torch.tensor([0.1, 0.2]), torch.tensor([0, 0])))


def test_map_skips_classes_without_positives():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.4], [0.6, 0.3, 0.3]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    # class 0: positive ranked 1st -> 1.0; class 1: positive (0.3) ranked 2nd of 3 -> 1/2; class 2: no positive
    assert mean_average_precision(scores, targets) == pytest.approx((1.0 + 0.5) / 2)


def test_accuracy_by_group_counts_each_speakers_top1_answers():
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.1, 0.9]])
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # right, wrong, right, right, wrong
    assert accuracy_by_group(scores, target, ["b", "a", "b", "a", "c"]) == {"a": (1, 2), "b": (2, 2), "c": (0, 1)}
    with pytest.raises(ValueError):  # one group per clip
        accuracy_by_group(scores, target, ["a", "b"])
