"""Behaviour pinned before the executor and precision-pipeline refactor (issue 16).

A fixed seeded model and fixed calibration data; the expected values were computed
with the code as it was before the refactor and written here as literals. The probe
ranges, every calibrated INT8 range, the FP16 keep-list and the whole precision
report written into module files (values and key order) must not move.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import trtopt
from tests._models import ResidualCNN
from trtopt.spec import tensor_specs
from trtopt.precision import feed_batches, tensor_ranges

# Every float here is measured on ONNX Runtime's outputs, except the input's plain max (compared
# exactly below). ONNX Runtime's float kernels (MLAS) take another code path per ISA (AVX2,
# AVX-512, VNNI, AMX) and per thread split, and sum in another order there: each conv output moves
# by a few float32 ulps (1.2e-7) per tap, and these convs sum 144 taps over 3 layers (seen: 8e-6 on
# an AVX-512 VNNI CPU, where 1e-6 failed). Ranges follow their tensor's max through the histogram,
# and the readout its outputs. 1e-4 bounds that with margin, and stays far below what a change of
# behaviour moves (another calibrator, SmoothQuant or float part moves these values by 1e-3 to 1e-1).
RELATIVE = 1e-4


def seeded_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return ResidualCNN().eval()


def calibration_batches() -> list[torch.Tensor]:
    rng = np.random.default_rng(0)
    return [torch.from_numpy(rng.standard_normal((4, 3, 16, 16)).astype(np.float32) * 3) for _ in range(10)]


def compile_seeded(precision: str, **settings: object) -> trtopt.CompiledModule:
    data = calibration_batches()
    return trtopt.compile(seeded_model(), (data[0],), precision=precision, backend="onnxruntime",
                          calibration_data=None if precision == "fp32" else data, **settings)


def saved_report(module: trtopt.CompiledModule, tmp_path) -> dict:
    """The precision report as the module file holds it (JSON, in its key order)."""
    path = module.save(tmp_path / "m.trtopt")
    report = json.loads(json.dumps(trtopt.load(path, backend="onnxruntime").spec.info["precision"]))
    report.pop("calibration_seconds", None)  # wall-clock time: the one value that is not reproducible
    return report


def assert_same(actual: object, expected: object, where: str = "report") -> None:
    """Equal structure and key order; floats equal to RELATIVE."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), where
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}[{i}]")
    elif isinstance(expected, float) and not isinstance(expected, bool):
        assert isinstance(actual, float), where
        assert actual == pytest.approx(expected, rel=RELATIVE, abs=1e-12) or (math.isnan(actual) and math.isnan(expected)), where
    else:
        assert actual == expected and type(actual) is type(expected), f"{where}: {actual!r} != {expected!r}"


def test_probe_ranges_are_pinned() -> None:
    graph = compile_seeded("fp32").onnx_model
    _, batches = feed_batches(calibration_batches(), tensor_specs(graph.graph.input))
    ranges = tensor_ranges(graph, batches())
    assert_same(ranges, RANGES, "ranges")
    # the input's range is max |x| over the data: no kernel or summation order in it, so exact
    assert ranges["x"] == RANGES["x"] == float(np.abs(np.stack(calibration_batches())).max())


def test_int8_report_and_ranges_are_pinned(tmp_path) -> None:
    assert_same(saved_report(compile_seeded("int8"), tmp_path), INT8_REPORT)


def test_int8_percentile_fp32_float_part_is_pinned(tmp_path) -> None:
    module = compile_seeded("int8", calibrator="percentile", int8_float_precision="fp32", smoothquant=None)
    assert_same(saved_report(module, tmp_path), PERCENTILE_FP32_REPORT)


def test_fp16_keep_list_is_pinned(tmp_path) -> None:
    assert_same(saved_report(compile_seeded("fp16", fp16_threshold=8.0), tmp_path), FP16_REPORT)


def test_fp32_and_carried_reports_are_pinned(tmp_path) -> None:
    assert saved_report(compile_seeded("fp32"), tmp_path) == {}
    carried = trtopt.compile(compile_seeded("int8").onnx_model, backend="onnxruntime")
    assert_same(saved_report(carried, tmp_path), {"precision": "int8", "from_graph": True, "qdq_nodes": 12})


# ---------------------------------------------------------- expected values (computed before the refactor)

RANGES = {'output': 1.7958611249923706,
 'getitem': 8.400463104248047,
 'relu': 8.077393531799316,
 'getitem_3': 3.007291078567505,
 'relu_1': 2.642047166824341,
 'getitem_6': 1.1298600435256958,
 'add': 8.249698638916016,
 'relu_2': 8.249698638916016,
 'max_pool2d': 8.249698638916016,
 'mean': 2.4316835403442383,
 'view': 2.4316835403442383,
 'x': 13.482351303100586}

INT8_REPORT = {'precision': 'int8',
 'calibrator': 'auto',
 'calibration_batches': 8,
 'calibration_from_cache': False,
 'float_precision': 'fp16',
 'int8_layout': 'tensorrt',  # added with int8_layout (issue 17)
 'overflow_checked': True,
 'qdq_nodes': 12,
 'q_nodes': 4,
 'dq_nodes': 8,
 'quantized_activations': 4,
 'quantized_weights': 4,
 'quantized_units': [{'node': 'stem.0/Conv', 'op': 'Conv', 'module': 'stem.0'},
                     {'node': 'block.0/Conv', 'op': 'Conv', 'module': 'block.0'},
                     {'node': 'block.3/Conv', 'op': 'Conv', 'module': 'block.3'},
                     {'node': 'head.3/Gemm', 'op': 'Gemm', 'module': 'head.3'}],
 'not_quantized': [],
 'floored_scales': [],
 'fp16_nodes': 24,
 'casts_added': 2,
 'kept_fp32': [],
 'fp16_safe_masks': [],
 'activation_amax': {'x': 11.955053694546223,
                     'relu': 7.166320335585624,
                     'relu_1': 2.4033856795867905,
                     # measured on the smoothed tensor since issue 23 (was max |x / s| from statistics: 0.9274165101222296)
                     'view__smoothed': 0.9274165034294128},
 'smoothquant': {'alpha': 0.85,
                 'calibrator': 'minmax',  # added with issue 23 (auto takes max |x| for smoothed tensors)
                 'tensors': [{'tensor': 'view__smoothed',
                              'units': ['head.3/Gemm'],
                              'folded_into': None,
                              'scale_min': 1.846399034911799,
                              'scale_max': 2.668927932761353,
                              'amax_before': 2.4316835403442383,
                              'amax_after': 0.9274165101222296}]},
 'range_checks': {'x': {'method': 'auto:mse',
                        'amax': 11.955053694546223,
                        'clipped': 8.138020833333333e-05,
                        'error': 0.009647154462889603,
                        'module': 'stem.0'},
                  'relu': {'method': 'auto:mse',
                           'amax': 7.166320335585624,
                           'clipped': 2.288818359375e-05,
                           'error': 0.010496809267245581,
                           'module': 'block.0'},
                  'relu_1': {'method': 'auto:mse',
                             'amax': 2.4033856795867905,
                             'clipped': 4.57763671875e-05,
                             'error': 0.010078137756366736,
                             'module': 'block.3'},
                  # range-checked since issue 23
                  'view__smoothed': {'method': 'minmax',
                                     'amax': 0.9274165034294128,
                                     'clipped': 0.0,
                                     'error': 0.0028141276832909256,
                                     'module': 'head.3'}},
 'accuracy': {'samples': 8,
              'cosine': 0.9999875408871071,
              'min_cosine': 0.9999795064291395,
              'max_abs': 0.014042437076568604,
              'top1_agreement': 1.0,
              'held_back': True}}

FP16_REPORT = {'precision': 'fp16',
 'qdq_nodes': 0,
 'overflow_checked': True,
 'fp16_nodes': 4,
 'casts_added': 4,
 'kept_fp32': [{'node': 'stem.0/Conv',
                'op': 'Conv',
                'reason': "activation 'x' reaches 13.48 on the calibration data (threshold 8)",
                'module': 'stem.0'},
               {'node': 'stem.2/Relu',
                'op': 'Relu',
                'reason': "activation 'getitem' reaches 8.4 on the calibration data (threshold 8)",
                'module': 'stem.2'},
               {'node': 'block.0/Conv',
                'op': 'Conv',
                'reason': "activation 'relu' reaches 8.077 on the calibration data (threshold 8)",
                'module': 'block.0'},
               {'node': 'Add',
                'op': 'Add',
                'reason': "activation 'add' reaches 8.25 on the calibration data (threshold 8)",
                'module': ''},
               {'node': 'Relu',
                'op': 'Relu',
                'reason': "activation 'add' reaches 8.25 on the calibration data (threshold 8)",
                'module': ''},
               {'node': 'pool/MaxPool',
                'op': 'MaxPool',
                'reason': "activation 'relu_2' reaches 8.25 on the calibration data (threshold 8)",
                'module': 'pool'},
               {'node': 'head.0/ReduceMean',
                'op': 'ReduceMean',
                'reason': "activation 'max_pool2d' reaches 8.25 on the calibration data (threshold 8)",
                'module': 'head.0'}],
 'fp16_safe_masks': [],
 'accuracy': {'samples': 8,
              'cosine': 0.9999999597218749,
              'min_cosine': 0.999999931876951,
              'max_abs': 0.0008701086044311523,
              'top1_agreement': 1.0,
              'held_back': True}}

PERCENTILE_FP32_REPORT = {'precision': 'int8',
 'calibrator': 'percentile',
 'calibration_batches': 8,
 'calibration_from_cache': False,
 'float_precision': 'fp32',
 'int8_layout': 'tensorrt',  # added with int8_layout (issue 17)
 'overflow_checked': False,
 'percentile': 99.99,
 'qdq_nodes': 12,
 'q_nodes': 4,
 'dq_nodes': 8,
 'quantized_activations': 4,
 'quantized_weights': 4,
 'quantized_units': [{'node': 'stem.0/Conv', 'op': 'Conv', 'module': 'stem.0'},
                     {'node': 'block.0/Conv', 'op': 'Conv', 'module': 'block.0'},
                     {'node': 'block.3/Conv', 'op': 'Conv', 'module': 'block.3'},
                     {'node': 'head.3/Gemm', 'op': 'Gemm', 'module': 'head.3'}],
 'not_quantized': [],
 'floored_scales': [],
 'activation_amax': {'x': 11.836556466296315,
                     'relu': 6.527385886292905,
                     'relu_1': 2.2808297807350755,
                     'view': 2.4316835403442383},
 'range_checks': {'x': {'method': 'percentile',
                        'amax': 11.836556466296315,
                        'clipped': 8.781033892620489e-05,
                        'error': 0.009685812058188947,
                        'module': 'stem.0'},
                  'relu': {'method': 'percentile',
                           'amax': 6.527385886292905,
                           'clipped': 9.918212890625e-05,
                           'error': 0.011210829447005707,
                           'module': 'block.0'},
                  'relu_1': {'method': 'percentile',
                             'amax': 2.2808297807350755,
                             'clipped': 9.918212890625e-05,
                             'error': 0.010289309806495096,
                             'module': 'block.3'},
                  'view': {'method': 'percentile',
                           'amax': 2.4316835403442383,
                           'clipped': 0.0,
                           'error': 0.003297905073948747,
                           'module': 'head.3'}},
 'accuracy': {'samples': 8,
              'cosine': 0.9999844830316466,
              'min_cosine': 0.9999796626217599,
              'max_abs': 0.015628576278686523,  # 0.0156248 before the CPU integer kernels (issue 17): float rounding
              'top1_agreement': 1.0,
              'held_back': True}}

