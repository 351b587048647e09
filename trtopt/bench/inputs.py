"""Synthetic inputs: image-like calibration data, random models made to behave like trained ones, timing inputs for a compiled module's spec."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import ConfigError, InputError


def structured_images(count: int, size: int, *, seed: int = 0) -> torch.Tensor:
    """Image-like inputs ``[count, 3, size, size]``, normalised like ImageNet.

    White noise is a poor stand-in for photographs when calibrating: real
    images are smooth with edges. These are a few random low-frequency
    gratings plus a bright disc and a dark square per image, so activations
    have realistic spatial correlation. Deterministic for a given seed.
    """
    gen = torch.Generator().manual_seed(seed)
    coords = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    images = torch.zeros(count, 3, size, size)
    for _ in range(3):
        freq = torch.rand(count, 3, 2, generator=gen) * 6 + 0.5
        phase = torch.rand(count, 3, 1, 1, generator=gen) * 2 * math.pi
        images += torch.sin(freq[..., 0, None, None] * math.pi * xx + freq[..., 1, None, None] * math.pi * yy + phase)
    centre = torch.rand(count, 2, generator=gen) * 1.2 - 0.6
    radius = torch.rand(count, generator=gen) * 0.3 + 0.15
    disc = ((xx - centre[:, 0, None, None]) ** 2 + (yy - centre[:, 1, None, None]) ** 2) < radius[:, None, None] ** 2
    images += 2.0 * disc[:, None].float()
    corner = torch.rand(count, 2, generator=gen) * 1.2 - 0.9
    square = (
        (xx > corner[:, 0, None, None]) & (xx < corner[:, 0, None, None] + 0.4)
        & (yy > corner[:, 1, None, None]) & (yy < corner[:, 1, None, None] + 0.4)
    )
    images -= 2.0 * square[:, None].float()
    pixels = (images - images.amin(dim=(2, 3), keepdim=True)) / (
        images.amax(dim=(2, 3), keepdim=True) - images.amin(dim=(2, 3), keepdim=True) + 1e-6
    )
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (pixels - mean) / std


def prepare_random_model(model: torch.nn.Module, images: torch.Tensor) -> torch.nn.Module:
    """Make a randomly initialised model behave more like a trained one, then set eval mode.

    Freshly initialised torchvision models are degenerate as classifiers:
    MobileNetV3's logits are about 1e-9 and every image gets the same class,
    and ViT's head is initialised to zeros. So BatchNorm running statistics are
    re-estimated on ``images`` (one forward pass in train mode, cumulative
    average), which gives each layer activations of realistic scale, and an
    all-zero Linear layer is re-drawn from N(0, 0.02). The weights stay random:
    accuracy columns measure agreement with this FP32 model, not task accuracy.
    """
    batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in batchnorms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average over the pass
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear) and not layer.weight.any():
            torch.nn.init.normal_(layer.weight, std=0.02)
    if batchnorms:
        model.train()
        with torch.no_grad():
            model(images)
    return model.eval()


def inputs_for_spec(spec: Any, batch_size: int | None = None, *, seed: int = 0) -> list[torch.Tensor]:
    """Timing inputs for a compiled module: profile 0's opt shape, batch (dim 0) optionally replaced.

    Float inputs are random normal, integer and bool inputs 0 or 1: these are
    for timing, not accuracy.
    """
    gen = torch.Generator().manual_seed(seed)
    profile = spec.profiles[0]
    tensors = []
    for t in spec.inputs:
        shape = list(profile[t.name].opt)
        if batch_size is not None:
            if not shape:
                raise ConfigError(f"input {t.name!r} is a scalar; it has no batch dimension to vary")
            shape[0] = batch_size
        dtype = getattr(torch, t.dtype, None)
        if dtype is None:
            raise InputError(f"input {t.name!r} has dtype {t.dtype}, which the harness cannot generate")
        if dtype.is_floating_point:
            tensors.append(torch.randn(shape, generator=gen).to(dtype))
        else:
            tensors.append(torch.randint(0, 2, shape, generator=gen).to(dtype))
    return tensors
