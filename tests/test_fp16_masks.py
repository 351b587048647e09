"""FP16-safe attention masks (issue 13): finfo.min / -inf mask constants no longer pin attention to FP32."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import trtopt
from trtopt.precision import convert_to_fp16, emulate_fp16, make_masks_fp16_safe, to_fp16
from trtopt.precision import tensor_ranges
from trtopt.precision.masks import MASK_VALUE
from tests._models import MaskedEncoder, padding_mask
from tests.helpers import max_relative_error

F32_MIN = float(np.finfo(np.float32).min)
ATTENTION_OPS = {"Softmax", "Add", "Where", "Mul", "Sub", "Cast", "Expand", "Reshape"}


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    from trtopt.executor.session import make_session

    return make_session(emulate_fp16(model)).run(None, feeds)


def _softmax_input_types(model: onnx.ModelProto) -> set[int]:
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*model.graph.value_info, *model.graph.input]}
    return {types[n.input[0]] for n in model.graph.node if n.op_type == "Softmax"}


# ------------------------------------------------------------- small graphs


def attention_graph(masks: int = 1, extras: bool = False) -> onnx.ModelProto:
    """scores = x @ W; Softmax(scores + Where(pad, finfo.min, 0) [+ a second mask]).

    With ``extras``, three large constants that are not masks: scores times -1e5
    into a Softmax (a temperature), scores plus -1e6 as a graph output, and
    finfo.min as the lower bound of a Clip before a Softmax.
    """
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    pad = helper.make_tensor_value_info("pad", TensorProto.BOOL, ["n", 4])
    out = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", 4])
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 4)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array(F32_MIN, np.float32), "neg_big"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["scores"], name="qk"),
        helper.make_node("Where", ["pad", "neg_big", "zero"], ["mask"], name="mask_where"),
        helper.make_node("Add", ["scores", "mask"], ["masked"], name="mask_add"),
    ]
    last = "masked"
    if masks == 2:  # a second, float mask built as (1 - keep) * finfo.min, as older BERT code does
        keep = helper.make_tensor_value_info("keep", TensorProto.FLOAT, ["n", 4])
        inits += [
            numpy_helper.from_array(np.array(1.0, np.float32), "one"),
            numpy_helper.from_array(np.array(F32_MIN, np.float32), "neg_big_2"),
        ]
        nodes += [
            helper.make_node("Sub", ["one", "keep"], ["inverted"], name="invert"),
            helper.make_node("Mul", ["inverted", "neg_big_2"], ["mask2"], name="mask_mul"),
            helper.make_node("Add", ["masked", "mask2"], ["masked2"], name="mask_add2"),
        ]
        last = "masked2"
    nodes.append(helper.make_node("Softmax", [last], ["probs"], name="softmax", axis=-1))
    inputs, outputs = [x, pad] + ([keep] if masks == 2 else []), [out]
    if extras:
        inits += [
            numpy_helper.from_array(np.array(-1e5, np.float32), "temperature"),
            numpy_helper.from_array(np.array(-1e6, np.float32), "shift"),
            numpy_helper.from_array(np.array(F32_MIN, np.float32), "clip_min"),
        ]
        nodes += [
            helper.make_node("Mul", ["scores", "temperature"], ["hot"], name="temp_mul"),
            helper.make_node("Softmax", ["hot"], ["hot_probs"], name="temp_softmax", axis=-1),
            helper.make_node("Add", ["scores", "shift"], ["shifted"], name="shift_add"),
            helper.make_node("Clip", ["scores", "clip_min"], ["clipped"], name="clip"),
            helper.make_node("Softmax", ["clipped"], ["clipped_probs"], name="clip_softmax", axis=-1),
        ]
        outputs += [
            helper.make_tensor_value_info("hot_probs", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("shifted", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("clipped_probs", TensorProto.FLOAT, ["n", 4]),
        ]
    graph = helper.make_graph(nodes, "attention", inputs, outputs, inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]))


def _feeds(masks: int = 1) -> dict[str, np.ndarray]:
    x = np.random.default_rng(1).normal(size=(4, 4)).astype(np.float32)
    pad = np.array([[0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], bool)  # last row: fully padded
    feeds = {"x": x, "pad": pad}
    if masks == 2:
        feeds["keep"] = np.array([[1, 0, 1, 1]] * 4, np.float32)
    return feeds


def test_only_the_mask_constant_is_rewritten_and_softmax_is_unchanged():
    model = attention_graph(extras=True)
    safe, report = make_masks_fp16_safe(model)
    assert [(r.constant, r.old, r.new, r.softmax) for r in report.rewrites] == [
        ("neg_big", F32_MIN, MASK_VALUE, ("softmax",))
    ]
    inits = {i.name: numpy_helper.to_array(i) for i in safe.graph.initializer}
    # The temperature (scores times -1e5), the shifted graph output and the Clip bound are not masks.
    assert inits["temperature"] == np.float32(-1e5) and inits["shift"] == np.float32(-1e6)
    assert inits["clip_min"] == np.float32(F32_MIN)
    assert "neg_big" not in inits and inits["neg_big__fp16_safe"] == np.float32(MASK_VALUE)
    feeds = _feeds()
    before, after = _ort(model, feeds), _ort(safe, feeds)
    for old, new in zip(before, after):
        # Rows keeping an unmasked position: exactly the same softmax, even in FP32.
        np.testing.assert_array_equal(old[:3], new[:3])
    # The fully padded row: finfo.min swallows the scores in FP32 (uniform weights); in FP16 the
    # spacing at 2**15 rounds these small scores into -32768, so the FP16 graph is uniform too.
    assert np.allclose(before[0][3], 0.25)
    half, _ = to_fp16(model, lambda: iter([feeds]))
    assert np.allclose(_ort(half, feeds)[0][3], 0.25)


@pytest.mark.parametrize("masks", [1, 2])
def test_the_rewritten_graph_keeps_its_inferred_types_without_a_new_check(masks):
    # The rewrite swaps constants for ones of the same shape and type: what shape inference and
    # the checker would make of its result is what it returns.
    from trtopt.graph import check_model

    safe, report = make_masks_fp16_safe(check_model(attention_graph(masks=masks, extras=True)))
    assert report.rewrites and len(safe.graph.value_info) > 0
    assert check_model(safe).graph == safe.graph


def test_a_model_without_a_mask_is_returned_as_is():
    model = attention_graph()
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.array(-1e4, np.float32), "neg_big"))
    same, report = make_masks_fp16_safe(model)
    assert same is model and report.rewrites == [] and report.offsets == {}


def test_stacked_masks_are_halved_so_their_sum_stays_finite_in_fp16():
    model = attention_graph(masks=2)
    safe, report = make_masks_fp16_safe(model)
    assert {r.constant: r.new for r in report.rewrites} == {"neg_big": MASK_VALUE / 2, "neg_big_2": MASK_VALUE / 2}
    assert report.offsets["masked2"] == -MASK_VALUE  # two halves summed into the softmax input
    feeds = _feeds(masks=2)
    half, fp16_report = to_fp16(model, lambda: iter([feeds]))
    assert fp16_report.kept == [] and _softmax_input_types(half) == {TensorProto.FLOAT16}
    (probs,) = _ort(half, feeds)
    (expected,) = _ort(model, feeds)
    assert np.isfinite(probs).all()
    assert np.abs(probs - expected).max() < 2e-3  # the fully padded row included


def test_without_the_rewrite_the_mask_pins_attention_to_fp32():
    model = attention_graph()
    feeds = _feeds()
    ranges = tensor_ranges(model, [feeds])
    _, plain = convert_to_fp16(model, ranges)
    assert {k.op for k in plain.kept} >= {"Where", "Add", "Softmax"}
    half, report = to_fp16(model, lambda: iter([feeds]))
    assert report.kept == [] and report.to_json()["fp16_safe_masks"][0]["from"] == F32_MIN


# -------------------------------------------------- nn.TransformerEncoder


ENCODER_SHAPES = {"tokens": {0: (1, 4, 8), 1: (2, 12, 24)}, "padding_mask": {0: (1, 4, 8), 1: (2, 12, 24)}}


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    model = MaskedEncoder().eval()
    generator = torch.Generator().manual_seed(1)
    calibration = [(torch.randn(4, 10, 32, generator=generator), padding_mask(4, 10)) for _ in range(4)]
    return model, calibration


@pytest.mark.slow
def test_transformer_encoder_with_a_padding_mask_runs_its_attention_in_fp16(encoder):
    model, calibration = encoder
    fast = trtopt.compile(
        model, calibration[0], precision="fp16", calibration_data=calibration,
        dynamic_shapes=ENCODER_SHAPES, backend="onnxruntime",
    )
    report = fast.precision_report
    # nn.MultiheadAttention builds its padding mask from -inf (which FP16 conversion used to refuse).
    assert [(m["from"], m["to"]) for m in report.fp16_safe_masks] == [("-inf", MASK_VALUE)]
    assert len(report.fp16_safe_masks[0]["softmax"]) == 2  # one per layer
    assert not [k for k in report.kept_fp32 if k["op"] in ATTENTION_OPS], report.kept_fp32
    assert _softmax_input_types(fast.onnx_model) == {TensorProto.FLOAT16}

    tokens, mask = torch.randn(5, 9, 32), padding_mask(5, 9)
    with torch.no_grad():
        expected = model(tokens, mask)
    # Padded positions included: they still attend to the real tokens of their sequence.
    assert max_relative_error(fast(tokens, mask), expected) < 5e-3
    # A fully padded sequence is NaN in PyTorch (every score -inf); FP16 gives a finite output.
    mask[2] = True
    with torch.no_grad():
        assert torch.isnan(model(tokens, mask)[2]).all()
    out = fast(tokens, mask)
    assert torch.isfinite(out).all()
    assert max_relative_error(out[[0, 1, 3, 4]], expected[[0, 1, 3, 4]]) < 5e-3


@pytest.mark.slow
def test_int8_float_part_gets_the_same_rewrite(encoder):
    model, calibration = encoder
    fast = trtopt.compile(
        model, calibration[0], precision="int8", calibration_data=calibration,
        dynamic_shapes=ENCODER_SHAPES, backend="onnxruntime", calibrator="minmax",
    )
    report = fast.precision_report
    assert report.float_precision == "fp16" and report.fp16_safe_masks
    assert not [k for k in report.kept_fp32 if k["op"] == "Softmax"], report.kept_fp32
    tokens, mask = torch.randn(3, 9, 32), padding_mask(3, 9)
    with torch.no_grad():
        expected = model(tokens, mask)
    assert max_relative_error(fast(tokens, mask), expected) < 0.1


# ------------------------------------------------- Hugging Face BERT


class Bert(torch.nn.Module):
    """A small ``transformers`` BertModel (random weights) taking an attention mask."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=32,
        )
        self.bert = BertModel(config, add_pooling_layer=False).eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _bert_batch(n: int, seq: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 100, (n, seq), generator=generator)
    mask = torch.ones(n, seq, dtype=torch.int64)
    for i in range(n):
        mask[i, i % seq + 1:] = 0  # sequence i has i % seq + 1 real tokens
    return ids, mask


@pytest.mark.slow
def test_hugging_face_bert_attention_mask_runs_in_fp16():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = Bert().eval()
    generator = torch.Generator().manual_seed(1)
    calibration = [_bert_batch(4, 10, generator) for _ in range(4)]
    shapes = {"input_ids": {0: (1, 4, 8), 1: (2, 12, 24)}, "attention_mask": {0: (1, 4, 8), 1: (2, 12, 24)}}
    fast = trtopt.compile(
        model, calibration[0], precision="fp16", calibration_data=calibration,
        dynamic_shapes=shapes, backend="onnxruntime",
    )
    report = fast.precision_report
    # Without the rewrite every layer kept its Where/Add/Softmax in FP32 ("reaches 3.403e+38").
    assert [(m["from"], m["to"], len(m["softmax"])) for m in report.fp16_safe_masks] == [(F32_MIN, MASK_VALUE, 2)]
    assert report.kept_fp32 == []
    assert _softmax_input_types(fast.onnx_model) == {TensorProto.FLOAT16}

    ids, mask = _bert_batch(6, 9, generator)
    with torch.no_grad():
        expected = model(ids, mask)
    assert max_relative_error(fast(ids, mask), expected) < 5e-3  # padded positions included
    # A fully padded sequence: the FP32 graph attends uniformly (finfo.min swallows the scores);
    # FP16 rounds the small scores into -32768 and attends uniformly too. (Eager PyTorch takes
    # another path for this case, so the exported FP32 graph is the reference here.)
    mask[5] = 0
    fp32 = trtopt.compile(model, calibration[0], dynamic_shapes=shapes, backend="onnxruntime")
    out, reference = fast(ids, mask), fp32(ids, mask)
    assert torch.isfinite(out).all()
    assert max_relative_error(out[5], reference[5]) < 5e-3


def test_ranges_measured_before_the_rewrite_are_refused_with_the_fix():
    from trtopt.errors import GraphError

    model = attention_graph()
    feeds = _feeds()
    with pytest.raises(GraphError, match="make_masks_fp16_safe first"):
        to_fp16(model, lambda: iter([feeds]), ranges=tensor_ranges(model, [feeds]))
    safe, masks = make_masks_fp16_safe(model)
    half, report = to_fp16(safe, lambda: iter([feeds]), ranges=tensor_ranges(safe, [feeds]), masks=masks)
    assert report.kept == [] and report.masks == masks.rewrites
