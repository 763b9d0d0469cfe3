"""Losses: the ground-truth loss of a task and the CMKD distillation loss (reference section 5).

CMKD: loss = lam * Lg(psi(Zs), y) + (1 - lam) * Ld(psi(Zs), psi(Zt / tau)). lam multiplies the
ground-truth term (EfficientAT's convention; FastAST uses lam = 0.1, tau = 1). The student's logits
are not divided by tau.
- multi-label:  psi = sigmoid, Lg = Ld = binary cross-entropy.
- single-label: psi = softmax, Lg = cross-entropy (soft targets allowed, for mixup), Ld = KL(teacher || student).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

TASKS = ("multi-label", "single-label")


def label_loss(logits: Tensor, target: Tensor, task: str) -> Tensor:
    """BCE-with-logits (multi-label) or cross-entropy against a (possibly mixed) target distribution."""
    logits = logits.float()
    if task == "multi-label":
        return F.binary_cross_entropy_with_logits(logits, target)
    if task == "single-label":
        return F.cross_entropy(logits, target / target.sum(dim=-1, keepdim=True))
    raise ValueError(f"unknown task {task!r}")


def distill_loss(student_logits: Tensor, teacher_logits: Tensor, task: str, tau: float) -> Tensor:
    """Ld(psi(Zs), psi(Zt / tau))."""
    student_logits, teacher = student_logits.float(), teacher_logits.float().detach() / tau
    if task == "multi-label":
        return F.binary_cross_entropy_with_logits(student_logits, teacher.sigmoid())
    if task == "single-label":
        return F.kl_div(student_logits.log_softmax(-1), teacher.log_softmax(-1), reduction="batchmean", log_target=True)
    raise ValueError(f"unknown task {task!r}")


def cmkd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, task: str, lam: float, tau: float) -> Tensor:
    return lam * label_loss(student_logits, target, task) + (1 - lam) * distill_loss(student_logits, teacher_logits, task, tau)
