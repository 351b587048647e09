"""The model Triton's Python backend runs for the ``python`` flavour of ``export_triton``.

Each version directory holds ``model.trtopt`` and a two-line ``model.py``
that imports ``TritonPythonModel`` from here, so the serving code is part of
trtopt and tested with it. Triton's dynamic batcher hands ``execute`` several
requests at once; they are concatenated along the batch dimension, run as one
call, and the outputs split back (what PyTriton's ``@batch`` does).

Errors reach the client as one line and never carry a traceback or a server
path: trtopt's own errors (a shape outside the profiles, ...) are already
worded for users; anything else is logged in full in the server log and
reported to the client by its type only.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import TrtoptError
from .spec import structure_leaves
from .compiler import load

logger = logging.getLogger(__name__)

MODULE_FILE = "model.trtopt"  # trtopt.triton.MODULE_FILE (that module needs tritonclient, this one not)


def _numpy_dtype(name: str) -> np.dtype | None:
    try:
        return np.dtype(name)
    except TypeError:  # bfloat16: numpy has none, the backend's array goes out as it is
        return None


class TritonPythonModel:
    """Triton's Python-backend model interface: ``initialize``, ``execute``, ``finalize``."""

    def initialize(self, args: dict[str, str]) -> None:
        # Provided by Triton's Python backend stub, only inside a running server.
        import triton_python_backend_utils as pb_utils

        self._pb = pb_utils
        self.name = args["model_name"]
        config = json.loads(args["model_config"])
        self.batched = int(config.get("max_batch_size", 0)) > 0
        path = Path(args["model_repository"]) / args["model_version"] / MODULE_FILE
        self.module = load(path)
        self.input_names = self.module.input_names
        self.output_names = self.module.output_names
        # The dtypes the config promises the client (a backend may hand back FP16 outputs as FP32).
        self.output_dtypes = [_numpy_dtype(t.dtype) for t in self.module.spec.outputs]
        pb_utils.Logger.log_info(
            f"trtopt: {self.name} loaded ({self.module.backend_name}, {self.module.precision}, "
            f"{'batched' if self.batched else 'unbatched'})"
        )

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        """One response per request, in order; a failed group answers each of its requests with the error."""
        responses: list[Any] = [None] * len(requests)
        inputs: dict[int, list[np.ndarray]] = {}
        for i, request in enumerate(requests):
            try:
                inputs[i] = self._inputs(request)
            except Exception as exc:  # answered; the other requests still run
                responses[i] = self._pb.InferenceResponse(error=self._pb.TritonError(self._client_message(exc)))
        for indices in self._groups(inputs):
            try:
                outputs = self._run([inputs[i] for i in indices])
            except Exception as exc:  # whatever the model raises: answered, the server stays up
                error = self._pb.TritonError(self._client_message(exc))
                for i in indices:
                    responses[i] = self._pb.InferenceResponse(error=error)
                continue
            for i, values in zip(indices, outputs):
                tensors = [self._pb.Tensor(name, value) for name, value in zip(self.output_names, values)]
                responses[i] = self._pb.InferenceResponse(output_tensors=tensors)
        return responses

    def finalize(self) -> None:
        del self.module  # Triton unloads the model: release the module (and its engine) now

    # ------------------------------------------------------------------ helpers

    def _inputs(self, request: Any) -> list[np.ndarray]:
        return [self._pb.get_input_tensor_by_name(request, name).as_numpy() for name in self.input_names]

    def _groups(self, inputs: dict[int, list[np.ndarray]]) -> list[list[int]]:
        """Requests that can run as one batch: equal shapes past the batch dim (Triton batches only
        those, but a request carrying its own batch of another length must not be mixed in)."""
        if not self.batched:
            return [[i] for i in inputs]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, arrays in inputs.items():
            key = tuple((a.shape[1:], a.dtype.str) for a in arrays)
            groups.setdefault(key, []).append(i)
        return list(groups.values())

    def _run(self, group: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
        """Run a group of requests as one call; the outputs of each request, in output order."""
        if len(group) == 1:
            arrays = group[0]
        else:
            arrays = [np.concatenate(parts, axis=0) for parts in zip(*group)]
        leaves = structure_leaves(self.module.spec.output_structure, self.module(*arrays))
        leaves = [
            np.asarray(leaf) if dtype is None else np.asarray(leaf).astype(dtype, copy=False)
            for leaf, dtype in zip(leaves, self.output_dtypes)
        ]
        if len(group) == 1:
            return [leaves]
        bounds = np.cumsum([request[0].shape[0] for request in group])[:-1]
        per_output = [np.split(leaf, bounds, axis=0) for leaf in leaves]
        return [list(values) for values in zip(*per_output)]

    def _client_message(self, exc: Exception) -> str:
        if isinstance(exc, TrtoptError):
            return f"{self.name}: " + " ".join(str(exc).split())
        self._pb.Logger.log_error(f"trtopt: {self.name} failed:\n{traceback.format_exc()}")
        return (
            f"{self.name}: the model failed on this request ({type(exc).__name__}); "
            "the server log has the details"
        )
