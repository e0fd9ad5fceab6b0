"""Wire pieces every dialect shares: the sampling values each schema maps the same way, the
speech input and image size fields, and reading a size."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field

from engine.core.errors import InvalidRequestError
from engine.speech.service import MAX_SPEECH_INPUT_CHARS
from server.openapi import Published

# Sampling values so small that the logits overflow (a denormal temperature divides them to
# inf; a repetition_penalty under float32's range rounds to 0 there, giving inf and NaN), which
# broke decoding under an output grammar (a 500). Every dialect's schema maps them here:
# a temperature under GREEDY_BELOW is greedy (its distribution is the argmax already), and a
# repetition_penalty is at least MIN_REPETITION_PENALTY (still "always repeat").
GREEDY_BELOW = 1e-6
MIN_REPETITION_PENALTY = 1e-30


def _greedy_if_tiny(value: float) -> float:
    return 0.0 if 0 < value < GREEDY_BELOW else value


def representable_penalty(value: float) -> float:
    return max(value, MIN_REPETITION_PENALTY)


Temperature = Annotated[float, Field(ge=0, le=2), AfterValidator(_greedy_if_tiny)]

# The engine refuses blank and over-long input (every dialect).
SpeechInput = Annotated[str, Published(pattern=r"\S", maxLength=MAX_SPEECH_INPUT_CHARS)]

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
# What parse_size accepts; each model adds its own limits (multiples of 8, up to max_side).
Size = Annotated[str, Published(pattern=r"^(auto|\d{1,5}x\d{1,5})?$")]


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size in (None, "", "auto"):
        return None, None
    match = _SIZE.match(size)
    if not match:
        raise InvalidRequestError(
            f"size must look like 1024x1024 (width x height) or be 'auto'; got {size!r}",
            param="size",
        )
    return int(match.group(1)), int(match.group(2))
