"""Where a compile spends its time: one timer per stage, logged at DEBUG and kept in the module's metadata.

``compile`` times its stages (export and cleanup, the precision passes stage by stage, the
backend) and stores the seconds in ``module.spec.info["stage_seconds"]``, so a user sees
whether FP16's keep-list, calibration or the readout cost the time. Ground floor: no heavy imports.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)


class StageTimer:
    """Seconds per named stage (a stage entered twice adds up), in the order first entered."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
            logger.debug("compile stage %s: %.3f s", name, elapsed)

    def to_json(self) -> dict[str, float]:
        return {name: round(seconds, 4) for name, seconds in self.seconds.items()}
