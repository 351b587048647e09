"""End-to-end FP32 compilation on the ONNX Runtime backend, against the torch model."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
import torch

import trtopt
from tests._models import MaskedEncoder, ResidualCNN, TwoInputsDictOut, padding_mask
from tests.helpers import max_relative_error, same_structure

TOLERANCE = 1e-4  # max relative error at FP32 (tests.helpers.max_relative_error)


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = ResidualCNN().eval()
    # Batch and spatial size dynamic: min, opt, max per dim.
    compiled = trtopt.compile(
        model,
        (torch.randn(1, 3, 16, 16),),
        dynamic_shapes={"x": {0: (1, 4, 16), 2: (8, 16, 32), 3: (8, 16, 32)}},
        backend="onnxruntime",
    )
    return model, compiled


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    model = MaskedEncoder().eval()
    compiled = trtopt.compile(
        model,
        (torch.randn(2, 10, 32), padding_mask(2, 10)),
        dynamic_shapes={
            "tokens": {0: (1, 4, 8), 1: (2, 12, 24)},
            "padding_mask": {0: (1, 4, 8), 1: (2, 12, 24)},
        },
        backend="onnxruntime",
    )
    return model, compiled


@pytest.fixture(scope="module")
def two_inputs():
    torch.manual_seed(0)
    model = TwoInputsDictOut().eval()
    # Two optimization profiles: small and large batches.
    compiled = trtopt.compile(
        model,
        (torch.randn(3, 6), torch.randn(3, 3)),
        dynamic_shapes=[
            {"left": {0: (1, 2, 4)}, "right": {0: (1, 2, 4)}},
            {"left": {0: (5, 16, 64)}, "right": {0: (5, 16, 64)}},
        ],
        backend="onnxruntime",
    )
    return model, compiled


@pytest.mark.parametrize("batch,size", [(1, 8), (4, 16), (16, 32), (7, 12), (2, 30)])
def test_cnn_matches_torch_across_profile(cnn, batch, size):
    model, compiled = cnn
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        expected = model(x)
    actual = compiled(x)
    assert isinstance(actual, torch.Tensor)
    assert max_relative_error(actual, expected) <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("batch,seq", [(1, 2), (4, 12), (8, 24), (3, 17)])
def test_encoder_with_padding_mask_matches_torch(encoder, batch, seq):
    model, compiled = encoder
    tokens, mask = torch.randn(batch, seq, 32), padding_mask(batch, seq)
    with torch.no_grad():
        expected = model(tokens, mask)
    assert max_relative_error(compiled(tokens, mask), expected) <= TOLERANCE


@pytest.mark.parametrize("batch", [1, 2, 4, 5, 16, 33, 64])
def test_two_inputs_dict_output_across_two_profiles(two_inputs, batch):
    model, compiled = two_inputs
    left, right = torch.randn(batch, 6), torch.randn(batch, 3)
    with torch.no_grad():
        expected = model(left, right)
    actual = compiled(left, right)
    assert same_structure(actual, expected)
    assert max_relative_error(actual, expected) <= TOLERANCE


def test_keyword_inputs_and_numpy_in_numpy_out(two_inputs):
    model, compiled = two_inputs
    left, right = torch.randn(2, 6), torch.randn(2, 3)
    by_keyword = compiled(right=right, left=left)
    from_numpy = compiled(left.numpy(), right.numpy())
    assert isinstance(from_numpy["joint"], np.ndarray)
    assert isinstance(from_numpy["parts"], tuple)
    np.testing.assert_array_equal(from_numpy["joint"], by_keyword["joint"].numpy())


def test_module_describes_itself(cnn):
    _, compiled = cnn
    assert compiled.input_names == ["x"]
    assert compiled.backend_name == "onnxruntime"
    assert compiled.precision == "fp32"
    assert compiled.profiles[0]["x"].min == (1, 3, 8, 8)
    assert compiled.profiles[0]["x"].max == (16, 3, 32, 32)
    # Dynamic dims carry readable names in the graph.
    dims = compiled.spec.inputs[0].shape
    assert dims[1] == 3 and all(isinstance(d, str) and d.startswith("x_dim") for d in (dims[0], dims[2], dims[3]))


def test_concurrent_calls_from_threads(two_inputs):
    model, compiled = two_inputs
    inputs = [(torch.randn(b, 6), torch.randn(b, 3)) for b in (1, 3, 8, 20, 4, 64, 2, 5)]

    def call(pair):
        return compiled(*pair)["joint"]

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(call, inputs * 4))
    with torch.no_grad():
        expected = [model(*pair)["joint"] for pair in inputs * 4]
    for got, want in zip(results, expected):
        assert max_relative_error(got, want) <= TOLERANCE


def test_auto_backend_without_tensorrt_uses_onnxruntime(caplog):
    torch.manual_seed(0)
    model = TwoInputsDictOut().eval()
    with caplog.at_level("INFO", logger="trtopt"):
        compiled = trtopt.compile(model, (torch.randn(2, 6), torch.randn(2, 3)))
    assert compiled.backend_name == "onnxruntime"
    assert any("backend: onnxruntime" in r.getMessage() for r in caplog.records)
    # Without dynamic_shapes the module is static at the example shape.
    with pytest.raises(trtopt.ShapeError):
        compiled(torch.randn(3, 6), torch.randn(3, 3))


def test_forcing_tensorrt_without_it_says_what_to_install():
    if trtopt._deps.tensorrt_unavailable_reason() is None:
        pytest.skip("TensorRT and a GPU are present here")
    with pytest.raises(trtopt.DependencyError, match=r"trtopt\[gpu-cu12\].*trtopt\[gpu-cu13\]"):
        trtopt.compile(TwoInputsDictOut(), (torch.randn(2, 6), torch.randn(2, 3)), backend="tensorrt")
