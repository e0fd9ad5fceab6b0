"""Long-running generators (video, music), run as jobs: what they hand the job queue and the
contract they implement."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MediaResult:
    """An encoded file and what it holds (duration_s, fps, frames, width, height, format,
    sample_rate, seed, ... as the task has them)."""

    data: bytes
    media_type: str
    suffix: str  # file name suffix with its dot, e.g. ".mp4"
    metadata: dict[str, Any]
