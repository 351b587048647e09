"""Small real architectures the foundation tests compile (random weights, fixed seed)."""

from __future__ import annotations

import torch
from torch import nn


class ResidualCNN(nn.Module):
    """Conv + BatchNorm + ReLU, a residual add, max and adaptive average pooling."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16),
        )
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(16, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = torch.relu(y + self.block(y))
        return self.head(self.pool(y))


class MaskedEncoder(nn.Module):
    """nn.TransformerEncoder with a key padding mask input (True = padding)."""

    def __init__(self, d_model: int = 32) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, 4, 64, dropout=0.1, batch_first=True)
        # The nested-tensor fast path zeroes padded positions in eager mode only; keep eager and
        # exported graphs computing the same thing.
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(d_model, 8)

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        return self.out(self.encoder(tokens, src_key_padding_mask=padding_mask))


class TwoInputsDictOut(nn.Module):
    """Two inputs, a dict output holding a tensor and a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(3, 4)

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> dict[str, object]:
        ha, hb = self.a(left), self.b(right)
        return {"joint": torch.tanh(ha + hb), "parts": (ha, hb.sum(dim=-1))}


def padding_mask(batch: int, seq: int) -> torch.Tensor:
    """Each sequence padded after a different length (at least one real token)."""
    lengths = torch.arange(batch) % seq + 1
    return torch.arange(seq)[None, :] >= lengths[:, None]
