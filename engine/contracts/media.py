"""Long-running generators (video, music), run as jobs: what they hand the job queue and the
contract they implement."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from pydantic import Field, field_validator

from engine.contracts.base import AdapterOptions, Backend

if TYPE_CHECKING:  # a type only: contracts sit below the core and import none of it
    from engine.core.registry import ModelEntry

DEFAULT_MAX_PROMPT_CHARS = 4000
# A video model's frame counts: "8k+1" (LTX-Video), "4k+1" (Wan, CogVideoX), "any".
FRAME_RULE = re.compile(r"^\s*(\d+)\s*k\s*(?:\+\s*(\d+))?\s*$")


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
    and returns the normalized params the job stores (idempotent: validating them again gives
    them back); `run` later reports progress (0..1) and stops within one step of `cancelled`
    being set (RequestCancelledError)."""

    @classmethod
    def validate(cls, entry: ModelEntry, params: dict[str, Any]) -> dict[str, Any]:
        """The request checked against the entry's limits (InvalidRequestError naming the
        field), its defaults filled in, a seed chosen when it sets none."""
        ...

    def run(self, params: dict[str, Any], progress: Callable[[float], None],
            cancelled: threading.Event) -> MediaResult:
        """Generate and encode what `params` (from `validate`) describe."""
        ...


# -- the adapters' registry options -----------------------------------------------------------


class MediaOptions(AdapterOptions):
    """What every job generator reads: its prompt limit, durations (seconds) and guidance.
    Each subclass sets its own defaults."""

    # default_duration, when not set: this, or max_duration when that is shorter.
    DURATION_FALLBACK: ClassVar[float] = 10.0

    max_prompt_chars: int = Field(DEFAULT_MAX_PROMPT_CHARS, gt=0)
    default_duration: float | None = Field(None, gt=0)
    max_duration: float = Field(30.0, gt=0)
    default_guidance: float = Field(3.0, ge=0)

    @property
    def duration(self) -> float:
        """The duration of a request that asks for none."""
        if self.default_duration is not None:
            return self.default_duration
        return min(self.DURATION_FALLBACK, self.max_duration)


class MusicOptions(MediaOptions):
    """MusicGen (models.music:MusicGen)."""


class VideoOptions(MediaOptions):
    """Text to video (models.video:TextToVideo): the model's right defaults and limits, read
    at submit time without the model, and how to load it."""

    DURATION_FALLBACK: ClassVar[float] = 4.0

    max_duration: float = Field(10.0, gt=0)
    default_guidance: float = Field(5.0, ge=0)
    default_size: tuple[int, int] = (512, 512)  # [width, height]
    size_multiple: int = Field(8, gt=0)  # each side's multiple
    max_side: int | None = Field(None, gt=0)  # default: the default size's longer side
    min_side: int | None = Field(None, gt=0)  # default: 64, or less for a smaller default
    default_fps: int = Field(8, gt=0)
    max_fps: int = Field(60, gt=0)
    frame_rule: str = "any"  # frame counts "8k+1", "4k+1" or "any"
    max_frames: int | None = Field(None, gt=0)
    default_steps: int = Field(50, gt=0)
    max_steps: int = Field(100, gt=0)
    default_negative_prompt: str | None = None
    vae_dtype: str | None = None  # a torch dtype name: run the VAE so (float32 for Wan)
    vae_tiling: bool = False  # decode in tiles, to save memory
    # Extra pipeline call arguments, passed when the pipeline takes them.
    pipeline_kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("frame_rule")
    @classmethod
    def _frame_rule(cls, rule: str) -> str:
        match = FRAME_RULE.match(rule)
        if rule.strip().lower() != "any" and (match is None or int(match.group(1)) < 1):
            raise ValueError(f"{rule!r} is not of the form '8k+1', '4k+1' or 'any'")
        return rule
