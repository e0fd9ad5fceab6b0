"""Long-running generators (video, music), run as jobs: what they hand the job queue and the
contract they implement."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from engine.contracts.base import Backend
from engine.core.registry import ModelEntry


@dataclass(frozen=True)
class MediaResult:
    """An encoded file and what it holds (duration_s, fps, frames, width, height, format,
    sample_rate, seed, ... as the task has them)."""

    data: bytes
    media_type: str
    suffix: str  # file name suffix with its dot, e.g. ".mp4"
    metadata: dict[str, Any]


@runtime_checkable
class MediaGenerator(Backend, Protocol):
    """A job's generator (video, music). `validate` runs at submit time without a loaded model
    and returns the normalized params the job stores; `run` later reports progress (0..1) and
    stops within one step of `cancelled` being set."""

    @classmethod
    def validate(cls, entry: ModelEntry, params: dict[str, Any]) -> dict[str, Any]: ...

    def run(self, params: dict[str, Any], progress: Callable[[float], None],
            cancelled: threading.Event) -> MediaResult: ...
