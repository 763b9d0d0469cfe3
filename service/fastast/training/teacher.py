"""The CNN teacher for CMKD: EfficientNet-B2 (timm) + PSLA-style multi-head attention pooling over time.

PSLA's head outputs probabilities; this one outputs LOGITS (the attention-weighted sum of per-frame
class logits), so a temperature and BCE/KL-with-logits apply directly (reference section 5.3).
Input layout matches the AST: normalised features [batch, time, mel].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastast.model.card import ModelCard

ARCH = "efficientnet_b2"


class AttentionPool(nn.Module):
    """Per head: a sigmoid attention over time (normalised to sum 1) weights per-frame class logits."""

    def __init__(self, channels: int, num_classes: int, heads: int):
        super().__init__()
        self.att = nn.ModuleList(nn.Conv1d(channels, num_classes, 1) for _ in range(heads))
        self.cla = nn.ModuleList(nn.Conv1d(channels, num_classes, 1) for _ in range(heads))
        self.head_weight = nn.Parameter(torch.full((heads,), 1.0 / heads))

    def forward(self, x: Tensor) -> Tensor:  # x: [batch, channels, time]
        outputs = []
        for att, cla in zip(self.att, self.cla):
            weight = att(x).sigmoid().clamp(1e-7, 1 - 1e-7)
            weight = weight / weight.sum(dim=-1, keepdim=True)
            outputs.append((weight * cla(x)).sum(dim=-1))
        return (torch.stack(outputs, dim=-1) * self.head_weight).sum(dim=-1)


class EfficientNetTeacher(nn.Module):
    def __init__(self, num_classes: int, heads: int = 4):
        super().__init__()
        import timm

        self.backbone = timm.create_model(ARCH, pretrained=False, in_chans=1, num_classes=0, global_pool="")
        self.pool = AttentionPool(self.backbone.num_features, num_classes, heads)

    def forward(self, features: Tensor) -> Tensor:
        """Logits [batch, classes] for normalised features [batch, time, mel]."""
        x = self.backbone(features.unsqueeze(1).transpose(2, 3))  # [B, C, mel', time']
        return self.pool(x.mean(dim=2))


def teacher_arch(target_length: int, num_mel_bins: int = 128, heads: int = 4) -> dict:
    """The card's `arch` entry of a teacher."""
    return {"type": ARCH, "heads": heads, "target_length": target_length, "num_mel_bins": num_mel_bins}


def build_teacher(card: ModelCard) -> EfficientNetTeacher:
    return EfficientNetTeacher(card.num_classes, heads=int(card.arch.get("heads", 4)))
