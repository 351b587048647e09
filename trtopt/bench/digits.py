"""Real data and small trained models: scikit-learn's digits, for the tests, benchmarks and notebook.

scikit-learn's digits (1797 8x8 images, 10 classes) train a small CNN and a
small transformer in seconds on a CPU, so FP16 and INT8 are held to a real
held-out accuracy instead of to random weights. scikit-learn is optional
(the ``bench`` and ``dev`` extras install it); ``load_digits`` says so when it
is missing. Training is seeded and single-threaded: the same weights each run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import DependencyError

TEST_SIZE = 500
CALIBRATION_SIZE = 256
CALIBRATION_BATCH = 64


@dataclass(frozen=True)
class Digits:
    train_x: torch.Tensor  # [N, 1, 8, 8] float32 in [0, 1]
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def calibration_batches(self, rows: bool = False) -> list[torch.Tensor]:
        """Training images (never the test set) in batches, as a calibration loader would give them."""
        x = self.train_x[:, 0] if rows else self.train_x
        return list(torch.split(x[:CALIBRATION_SIZE], CALIBRATION_BATCH))


def load_digits(seed: int = 0) -> Digits:
    """The 1797 images in an order shuffled by ``seed``: the first TEST_SIZE are held out for testing."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as exc:
        raise DependencyError(
            f"the digits data set comes with scikit-learn, which is not installed ({exc}); "
            "install it with `pip install scikit-learn` or `pip install trtopt[bench]`"
        ) from exc

    data = sklearn_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    x = torch.tensor(data.images[order] / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(data.target[order], dtype=torch.long)
    return Digits(x[TEST_SIZE:], y[TEST_SIZE:], x[:TEST_SIZE], y[:TEST_SIZE])


class DigitsCNN(nn.Module):
    """Conv + BatchNorm + ReLU, a residual block, max pooling, global average pooling, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16),
        )
        self.pool = nn.MaxPool2d(2)
        self.conv = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = torch.relu(y + self.block(y))
        y = self.conv(self.pool(y))
        return self.head(y.mean(dim=(2, 3)))


class DigitsTransformer(nn.Module):
    """Reads a digit as a sequence of 8 rows of 8 pixels: embedding, 2 encoder layers, mean pool."""

    def __init__(self, d_model: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d_model)
        self.position = nn.Parameter(torch.zeros(8, d_model))
        layer = nn.TransformerEncoderLayer(d_model, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(x) + self.position)
        return self.head(h.mean(dim=1))


def train(
    make_model: Callable[[], nn.Module], digits: Digits, *, rows: bool = False, epochs: int = 8, seed: int = 0
) -> nn.Module:
    """Build ``make_model()`` and train it with Adam, all from ``seed``; returns it in eval mode.

    One thread: the result is reproducible, and on a shared CPU it is several
    times faster than torch's default thread pool.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = make_model()
        x = digits.train_x[:, 0] if rows else digits.train_x
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(epochs):
            for index in torch.randperm(len(x)).split(64):
                loss = nn.functional.cross_entropy(model(x[index]), digits.train_y[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def top1(logits: torch.Tensor | np.ndarray, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    logits = torch.as_tensor(np.asarray(logits, dtype=np.float32))
    return 100.0 * float((logits.argmax(dim=1) == labels).float().mean())


# ------------------------------------------------------------ other input encodings

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def signed(digits: Digits) -> Digits:
    """Pixels scaled to [-1, 1]: 17 values, most of them -1 (a 4-bit image's background)."""
    return Digits(digits.train_x * 2 - 1, digits.train_y, digits.test_x * 2 - 1, digits.test_y)


def uint8_imagenet(digits: Digits, size: int = 16) -> Digits:
    """Each digit upsampled to ``size`` x ``size`` RGB, stored as uint8 (256 levels) and normalised
    with ImageNet's mean and std, as torchvision's transforms feed a pretrained CNN."""

    def encode(x: torch.Tensor) -> torch.Tensor:
        rgb = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
        pixels = torch.round(rgb.clamp(0, 1) * 255) / 255  # what a uint8 image holds
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (pixels - mean) / std

    return Digits(encode(digits.train_x), digits.train_y, encode(digits.test_x), digits.test_y)


def standardized_features(digits: Digits) -> Digits:
    """The 64 pixels as tabular features standardised with the training set's mean and std.

    Pixels that are almost always 0 have a tiny std, so a rare stroke becomes a value of 10-40:
    the outliers standardised tabular data carries."""
    train, test = digits.train_x.flatten(1), digits.test_x.flatten(1)
    mean, std = train.mean(0), train.std(0).clamp(min=1e-2)
    return Digits((train - mean) / std, digits.train_y, (test - mean) / std, digits.test_y)


class DigitsDepthwiseCNN(nn.Module):
    """MobileNet-style: a stem Conv, depthwise-separable blocks (depthwise 3x3 + pointwise 1x1) with
    ReLU6, global average pooling and a Linear head; for 3 x 16 x 16 inputs."""

    def __init__(self) -> None:
        super().__init__()

        def separable(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin), nn.BatchNorm2d(cin), nn.ReLU6(),
                nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout), nn.ReLU6(),
            )

        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU6(),
            separable(16, 32, 2), separable(32, 32, 1), separable(32, 64, 2),
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class DigitsMLP(nn.Module):
    """Three Linear layers with GELU for 64 tabular features."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
