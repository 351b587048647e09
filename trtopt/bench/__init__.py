"""Measurement harness shared by ``benchmarks/``, ``notebooks/`` and ``trtopt bench``.

One place decides how trtopt is measured (clock, warm-up, percentiles, throughput,
accuracy, side-by-side timing, peak memory), so that a number in the README, in a
notebook and on the command line means the same thing: docs/benchmarks.md ("How trtopt
measures") gives the rules. Peak memory is taken over a variant's warm-up calls (the
same work as its timed calls, which alternate with other variants'); RSS counts the
whole process, so the growth over the window (``MemoryUsage.growth_bytes``) is kept too.

Results are dataclasses; ``BenchReport.to_json`` carries ``schema`` and
``schema_version`` so that readers can refuse files they do not understand.

Where things are: ``stats`` (percentiles, ``LatencyStats``), ``compare``
(accuracy against the reference; the math is ``trtopt.metrics``), ``memory``
(``PeakMemory``), ``timing`` (``measure_side_by_side``), ``results``
(``BenchResult``, ``BenchReport`` and their JSON), ``tables`` (markdown table,
latency-against-accuracy plot), ``candidates`` (the rows: eager torch, trtopt
modules), ``inputs`` (synthetic images and timing inputs) and ``profiling``
(per-layer profiles). Every public name is importable from ``trtopt.bench``,
except those of ``trtopt.bench.digits`` (real data and small trained models for
the tests, benchmarks and notebook; it needs scikit-learn), imported on their own.
"""


from ..executor.profiling import LayerProfile, LayerTime, parse_onnxruntime_profile
from .candidates import (
    Candidate,
    compiled_candidate,
    run_side_by_side,
    torch_candidate,
    torch_reference,
    trtopt_candidate,
)
from .compare import Accuracy, compare_outputs, output_leaves, run_in_chunks
from .inputs import inputs_for_spec, prepare_random_model, structured_images
from .memory import MemoryUsage, PeakMemory, most_demanding
from .profiling import (
    attribute_modules,
    plot_layer_profile,
    profile_layers,
    profile_onnxruntime,
    profile_tensorrt,
)
from .results import SCHEMA, SCHEMA_VERSION, BenchReport, BenchResult, device_name, environment
from .stats import PERCENTILE_METHOD, LatencyStats, percentiles
from .tables import markdown_table, plot_latency_vs_accuracy
from .timing import is_cuda, measure_latency, measure_side_by_side

__all__ = [
    "PERCENTILE_METHOD",
    "SCHEMA",
    "SCHEMA_VERSION",
    "Accuracy",
    "BenchReport",
    "BenchResult",
    "Candidate",
    "LatencyStats",
    "LayerProfile",
    "LayerTime",
    "MemoryUsage",
    "PeakMemory",
    "attribute_modules",
    "compare_outputs",
    "compiled_candidate",
    "device_name",
    "environment",
    "inputs_for_spec",
    "is_cuda",
    "markdown_table",
    "measure_latency",
    "measure_side_by_side",
    "most_demanding",
    "output_leaves",
    "parse_onnxruntime_profile",
    "percentiles",
    "plot_latency_vs_accuracy",
    "plot_layer_profile",
    "prepare_random_model",
    "profile_layers",
    "profile_onnxruntime",
    "profile_tensorrt",
    "run_in_chunks",
    "run_side_by_side",
    "structured_images",
    "torch_candidate",
    "torch_reference",
    "trtopt_candidate",
]
