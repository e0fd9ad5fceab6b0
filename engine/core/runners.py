"""What the model manager needs of a loaded model's runner (the chat scheduler, the batcher, or
none for job models): its load for /v1/models and a way to stop it. Which runner a model gets
is decided above the core (engine/runners.py) and handed to the manager."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from engine.core.errors import EmberError
from engine.core.registry import ModelEntry
from engine.core.settings import Settings

if TYPE_CHECKING:
    from engine.core.compute import ComputeThread


class Runner(Protocol):
    @property
    def pending(self) -> int: ...

    @property
    def queued(self) -> int: ...

    @property
    def load_fraction(self) -> float: ...

    def shutdown(self, error: EmberError | None = None) -> None: ...


class JobSlotRunner:
    """Video and music run as jobs on their own threads (engine/jobs/runner.py); the job queue is
    their queue, so the loaded model needs no runner of its own."""

    pending = 0
    queued = 0
    load_fraction = 0.0

    def shutdown(self, error: EmberError | None = None) -> None:
        pass


RunnerFactory = Callable[[ModelEntry, Any, Settings, "ComputeThread"], Runner]
