"""Image generation: request and result types, the limits every image model shares, and the
contract an image model implements."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import Field

from engine.contracts.base import AdapterOptions, BatchBackend

MAX_IMAGES = 10  # OpenAI's limit on `n`
# What every image model of ember takes, whatever its own limits: latent diffusion works on an
# 8-pixel grid, from 64 pixels a side; seeds are torch's 64-bit generator seeds.
SIDE_MULTIPLE = 8
MIN_SIDE = 64
MAX_SEED = 2**63 - 1
MAX_GUIDANCE = 30.0

ImageMode = Literal["generate", "edit", "variation"]


@dataclass(frozen=True)
class ImageRequest:
    """Text to image, or (with `image`) image to image; `mask` marks where to repaint
    (transparent pixels, as OpenAI's edits). None means the model's own default."""

    model: str | None  # None: the task's default model
    prompt: str
    mode: ImageMode = "generate"
    n: int = 1
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    quality: str = "auto"
    strength: float | None = None
    image: bytes | None = None
    mask: bytes | None = None
    output_format: str = "png"


@dataclass(frozen=True)
class GeneratedImage:
    data: bytes  # encoded in the requested format
    media_type: str
    suffix: str
    seed: int
    file_id: str | None = None  # in the file store, when the request asked to keep it


@dataclass
class ImageResult:
    prompt: str
    images: list[GeneratedImage]
    served_by: str = ""  # the id of the registry entry that ran it


@runtime_checkable
class ImageGenerator(BatchBackend, Protocol):
    """`prepare` checks the request against the model's own limits and returns one job per
    image (each with its `seed` and a `cancelled` event); `batch` runs jobs to PIL images."""

    def prepare(self, request: ImageRequest) -> list[Any]:
        """One job per image to make (InvalidRequestError naming the field the model cannot
        take; UnsupportedFeatureError for a mode it has no pipeline for)."""
        ...

    def batch(self, items: list[Any]) -> Sequence[Any]:
        """A PIL image per job, in order; a batch whose jobs are all cancelled stops at its
        next step (RequestCancelledError)."""
        ...


class DiffusionOptions(AdapterOptions):
    """diffusers image pipelines (models.diffusion:DiffusionImages): the model's right
    defaults and limits."""

    default_size: tuple[int, int] = (512, 512)  # [width, height]
    max_side: int | None = Field(None, gt=0)  # default: the default size's longer side
    default_steps: int = Field(30, gt=0)
    max_steps: int = Field(100, gt=0)
    default_guidance: float = Field(7.5, ge=0)
    max_prompt_chars: int = Field(4000, gt=0)
