"""One exception hierarchy for everything trtopt raises on purpose.

Every message names the problem and, where there is one, the fix. Catch
``TrtoptError`` to handle all of them; the subclasses also derive from the
matching built-in (``ValueError``, ``TypeError``, ``ImportError``) so generic
handlers keep working.
"""

from __future__ import annotations

from typing import Generic, TypeVar

# The report an AccuracyBudgetError carries (``precision.budget.BudgetReport``), left as a
# type variable: this module is the package's ground floor and imports nothing from it.
Report = TypeVar("Report")


class TrtoptError(Exception):
    """Base class of every error trtopt raises deliberately."""


class ConfigError(TrtoptError, ValueError):
    """A setting or a ``dynamic_shapes`` spec is invalid."""


class ShapeError(TrtoptError, ValueError):
    """An input's rank or shape is outside what the compiled module accepts."""


class InputError(TrtoptError, TypeError):
    """An input is missing, unknown, of the wrong dtype, or not a tensor/array."""


class IndexRangeError(TrtoptError, IndexError):
    """An input holds an index outside the table it indexes (a token id outside the vocabulary)."""


class ExportError(TrtoptError):
    """The PyTorch model could not be turned into ONNX."""


class GraphError(TrtoptError):
    """The ONNX graph is invalid or a graph pass failed."""


class DependencyError(TrtoptError, ImportError):
    """An optional dependency (TensorRT, pycuda, a CUDA device) is missing."""


class ModuleFileError(TrtoptError):
    """A saved module file is truncated, corrupt, foreign or from an incompatible version, or its path
    cannot take one (a directory, a file in the way, not writable)."""


class CalibrationError(TrtoptError, ValueError):
    """Calibration data is empty, malformed or not finite, or a cache does not match."""


class BuildError(TrtoptError):
    """TensorRT could not parse the graph or build the engine."""


class EngineError(TrtoptError):
    """A serialized TensorRT engine could not be loaded or run."""


class ServeError(TrtoptError, RuntimeError):
    """The Triton server failed to start or stopped unexpectedly (the message quotes its log)."""


class AccuracyBudgetError(TrtoptError, Generic[Report]):
    """INT8 (or FP8) cannot meet the accuracy budget even with every unit in float.

    ``report`` is the search's ``BudgetReport``: what was tried and the best value reached.
    """

    def __init__(self, message: str, report: Report) -> None:
        super().__init__(message)
        self.report = report


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (libraries often append pages of advice)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
