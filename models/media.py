"""What the long-running generators (video, music) share: the result they hand the job queue,
checks for the request fields they have in common, and step progress with cancellation.

The job queue calls `validate` at submit time, without a loaded model, and stores what it
returns; `run` later gets those normalized params back, reports progress as steps complete
and stops within one step of `cancelled` being set.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, cast

from engine.contracts.media import MediaOptions, MediaResult
from engine.core.errors import InvalidRequestError, RequestCancelledError
from engine.core.registry import ModelEntry
from models.base import ModelAdapter

log = logging.getLogger(__name__)

PROGRESS_LOG_S = 5.0
MAX_SEED = 2**63 - 1
MAX_GUIDANCE = 30.0


def prompt_param(params: Mapping[str, Any], options: MediaOptions) -> str:
    prompt = params.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequestError("prompt is required and must be a non-empty string",
                                  param="prompt")
    limit = options.max_prompt_chars
    if len(prompt) > limit:
        raise InvalidRequestError(
            f"prompt has {len(prompt)} characters; the limit is {limit}", param="prompt"
        )
    return prompt


def optional_text_param(params: Mapping[str, Any], name: str, default: str | None) -> str | None:
    value = params.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise InvalidRequestError(f"{name} must be a string", param=name)
    return value if value.strip() else default


def number_param(
    params: Mapping[str, Any],
    name: str,
    default: float,
    *,
    low: float,
    high: float,
    low_inclusive: bool = True,
    unit: str = "",
) -> float:
    """A real number in [low, high] (or (low, high]); `default` when absent."""
    value = params.get(name)
    if value is None:
        return float(default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequestError(f"{name} must be a number; got {value!r}", param=name)
    too_low = value < low if low_inclusive else value <= low
    if too_low or value > high:
        opening = "between" if low_inclusive else "greater than"
        closing = "and" if low_inclusive else "and at most"
        raise InvalidRequestError(
            f"{name} must be {opening} {low:g} {closing} {high:g}{unit}; got {value:g}",
            param=name,
        )
    return float(value)


def integer_param(
    params: Mapping[str, Any], name: str, default: int, *, low: int, high: int
) -> int:
    """An integer in [low, high]; a float with no fraction (24.0) counts as one."""
    value = params.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer; got {value!r}", param=name)
    if not low <= value <= high:
        raise InvalidRequestError(
            f"{name} must be between {low} and {high}; got {value}", param=name
        )
    return value


def seed_param(params: Mapping[str, Any]) -> int:
    """The caller's seed, or a random one, so the stored job re-runs to the same result."""
    if params.get("seed") is None:
        return secrets.randbelow(2**31)
    return integer_param(params, "seed", 0, low=0, high=MAX_SEED)


class MediaAdapter(ModelAdapter):
    """A job generator (`MediaGenerator`, engine/contracts/media.py): what its `validate`
    checks for every task (prompt, duration, guidance, seed) is here; each task adds its own
    fields in `task_params`."""

    options: MediaOptions
    label: ClassVar[str] = "media"  # for progress logs and cancellation messages
    progress_increment: ClassVar[float] = 0.0  # the smallest progress step reported

    @classmethod
    def validate(cls, entry: ModelEntry, params: dict[str, Any]) -> dict[str, Any]:
        """The request checked against the entry's limits, with its defaults filled in (a
        seed chosen when it sets none). Idempotent: validating the result again returns it
        unchanged."""
        options = cast(MediaOptions, cls.parsed_options(entry))
        prompt = prompt_param(params, options)
        duration = number_param(
            params, "duration", options.duration, low=0.0, high=options.max_duration,
            low_inclusive=False, unit=" seconds",
        )
        own = cls.task_params(entry, options, params, duration)
        guidance = number_param(params, "guidance_scale", options.default_guidance,
                                low=0.0, high=MAX_GUIDANCE)
        return {"prompt": prompt, "duration": duration, **own, "seed": seed_param(params),
                "guidance_scale": guidance}

    @classmethod
    def task_params(cls, entry: ModelEntry, options: Any, params: Mapping[str, Any],
                    duration: float) -> dict[str, Any]:
        """The task's own fields, checked against `options` (its `options_model`)."""
        raise NotImplementedError

    def run(self, params: dict[str, Any], progress: Callable[[float], None],
            cancelled: threading.Event) -> MediaResult:
        """Validates `params` again (a job stored by an older version, too), then generates
        with progress over `steps(params)` steps, stopping at once when `cancelled`."""
        params = self.validate(self.entry, params)
        tracker = StepProgress(f"{self.entry.id} {self.label}", self.steps(params), progress,
                               cancelled, min_increment=self.progress_increment)
        tracker.check_cancelled()
        return self.generate(params, tracker)

    def steps(self, params: dict[str, Any]) -> int:
        """How many steps generating `params` takes (the encode after them counts one more)."""
        raise NotImplementedError

    def generate(self, params: dict[str, Any], tracker: StepProgress) -> MediaResult:
        """The result; `tracker.step()` after each step, `tracker.finish()` once encoded."""
        raise NotImplementedError


class StepProgress:
    """Turns completed steps into `progress` fractions, logs long runs every few seconds and
    raises `RequestCancelledError` as soon as `cancelled` is seen.

    The encode (and decode) after the last step counts as one more step, so the fraction
    reaches 1.0 only when the file is ready. `min_increment` thins out reports for runs with
    thousands of tiny steps (tokens).
    """

    def __init__(
        self,
        label: str,
        total_steps: int,
        progress: Callable[[float], None],
        cancelled: threading.Event,
        *,
        min_increment: float = 0.0,
    ):
        self.label = label
        self.total_steps = total_steps
        self.done = 0
        self._progress = progress
        self._cancelled = cancelled
        self._min_increment = min_increment
        self._reported = 0.0
        self._started = self._last_log = time.monotonic()

    def check_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise RequestCancelledError(
                f"{self.label}: cancelled after {self.done} of {self.total_steps} steps"
            )

    def step(self, done: int | None = None) -> None:
        """Record that one more step (or `done` steps in all) completed."""
        self.done = self.done + 1 if done is None else done
        fraction = min(self.done, self.total_steps) / (self.total_steps + 1)
        if fraction - self._reported >= self._min_increment or self.done == self.total_steps:
            self._reported = fraction
            self._progress(fraction)
        now = time.monotonic()
        if now - self._last_log >= PROGRESS_LOG_S:
            self._last_log = now
            log.info("%s: step %d/%d, %.0f s", self.label, self.done, self.total_steps,
                     now - self._started)
        self.check_cancelled()

    def finish(self) -> None:
        self._progress(1.0)
        elapsed = time.monotonic() - self._started
        if elapsed >= PROGRESS_LOG_S:
            log.info("%s: done in %.0f s", self.label, elapsed)
