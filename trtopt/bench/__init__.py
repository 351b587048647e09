"""Measurement harness shared by ``benchmarks/``, ``notebooks/`` and ``trtopt bench``.

One place decides how trtopt is measured, so that a number in the README, in a
notebook and on the command line means the same thing:

- **Clock.** GPU work is asynchronous: the host returns from a call before the
  kernels finish, so a host clock measures launch time. When the warm-up
  produced CUDA tensors, each run is timed with a pair of ``torch.cuda.Event``
  recorded on the current stream (the callable must enqueue on that stream or
  synchronise before returning, as trtopt's runtime does). On the CPU,
  ``time.perf_counter`` (monotonic, highest resolution) times each call.
- **Warm-up.** At least one untimed call: it pays one-off costs (allocator,
  kernel selection, lazy initialisation) and its outputs pick the clock.
- **Percentiles.** ``numpy.percentile`` with ``method="linear"`` (numpy's
  default; Hyndman and Fan's type 7): the p-th percentile of n sorted samples
  ``x[0..n-1]`` lies at rank ``(n - 1) * p / 100``, interpolated linearly
  between the two neighbouring samples. With few samples p99 is close to the
  maximum; report the iteration count with it (``LatencyStats.iterations``).
- **Throughput.** ``batch_size / p50``: samples per second at the median
  latency of one call (no overlapping of calls).
- **Accuracy.** Against the FP32 torch model on the same inputs: max and mean
  absolute error over every output element, cosine similarity of all outputs
  flattened into one vector, and for classifiers (first output ``[N, C]``,
  ``C > 1``) the fraction of samples whose arg-max class agrees.
- **Side by side.** Variants of one model are timed in alternating blocks
  (a few rounds, one block of calls of each per round), so load from other
  processes falls on all of them alike and their ratios stay fair on a
  shared machine (``measure_side_by_side``).
- **Peak memory.** Resident set size (RSS) of this process during a variant's
  warm-up calls (the same work as the timed calls, which alternate with other
  variants' and cannot be told apart). On Linux the kernel's peak (``VmHWM``)
  is reset through ``/proc/self/clear_refs`` first, so the peak is that of
  the measured window (``rss_scope="window"``); elsewhere it is the process's lifetime peak from
  ``resource.getrusage`` (``rss_scope="process"``). RSS counts everything the
  process holds, including the torch model it was compiled from, so the
  growth above the level at the window's start (``MemoryUsage.growth_bytes``)
  is also kept: the memory the calls themselves needed. On a GPU,
  ``torch.cuda.max_memory_allocated`` adds the peak of torch's allocator
  (memory TensorRT allocates outside torch is not in it).

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
