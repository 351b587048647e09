"""trtopt: compile trained PyTorch models into fast TensorRT engines.

    import trtopt
    fast = trtopt.compile(model, (x,), precision="fp32", dynamic_shapes={"x": {0: (1, 8, 32)}})
    y = fast(x)

Importing trtopt never imports TensorRT or pycuda; where they (or a GPU) are
missing, the compiled graph runs under ONNX Runtime on the CPU.
"""

import logging

from ._version import __version__
from .compiler import compile, load
from .config import Backend, BuildConfig, CalibratorKind, Precision
from .profiles import ShapeProfile
from .errors import (
    AccuracyBudgetError,
    BuildError,
    CalibrationError,
    ConfigError,
    DependencyError,
    EngineError,
    ExportError,
    GraphError,
    IndexRangeError,
    InputError,
    ModuleFileError,
    ServeError,
    ShapeError,
    TrtoptError,
)
from .module import CompiledModule
from .precision.budget import AccuracyBudget
from .precision.report import PrecisionReport
from .serve import serve  # the function; other names: `from trtopt.serve import ...`

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "__version__",
    "compile",
    "load",
    "serve",
    "CompiledModule",
    "AccuracyBudget",
    "AccuracyBudgetError",
    "PrecisionReport",
    "BuildConfig",
    "Precision",
    "Backend",
    "CalibratorKind",
    "ShapeProfile",
    "TrtoptError",
    "ConfigError",
    "ShapeError",
    "InputError",
    "IndexRangeError",
    "ExportError",
    "GraphError",
    "DependencyError",
    "ModuleFileError",
    "CalibrationError",
    "BuildError",
    "EngineError",
    "ServeError",
]
