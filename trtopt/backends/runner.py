"""The runner protocol: what ``CompiledModule`` needs from whatever runs its graph.

Named ``Runner`` rather than ``Backend`` because ``trtopt.Backend`` is the public
enum that *chooses* one (``"onnxruntime"``, ``"tensorrt"``, ``"auto"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch


class Runner(Protocol):
    """Runs a compiled graph: ``OnnxRuntimeBackend`` and ``runtime.TensorRTBackend``.

    ``run`` gets inputs the module has already validated (names, dtypes, ranks)
    and the index of the optimization profile that holds their shapes, and
    returns the outputs in graph order. A runner may also offer
    ``run_numpy(feeds) -> list[np.ndarray]``, the module's copy-free fast path.
    """

    name: str

    def run(self, feeds: Mapping[str, torch.Tensor], profile_index: int) -> list[torch.Tensor]: ...
