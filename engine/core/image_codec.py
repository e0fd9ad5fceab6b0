"""Images in and out: a caller's image decoded with PIL within a pixel cap (any failure is a
400 naming the field), and generated images encoded as png, jpeg or webp."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from PIL import Image, UnidentifiedImageError

from engine.core.errors import InvalidRequestError

IMAGE_FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"),
                 "webp": ("WEBP", "image/webp")}

# Decoded size cap. PIL only warns up to twice its own bomb limit (~179 megapixels); a
# caller's image is refused well before it costs that much memory.
MAX_IMAGE_PIXELS = 40_000_000


@contextmanager
def opened_image(data: bytes, param: str) -> Iterator[Image.Image]:
    """A caller's image opened with PIL (its header read, its pixels not yet decoded), within
    the pixel cap; anything PIL cannot read, or too large, is a 400 naming `param`."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InvalidRequestError(
                    f"the image is {width}x{height} pixels; at most {MAX_IMAGE_PIXELS} pixels "
                    "are accepted",
                    param=param,
                )
            yield opened
    except InvalidRequestError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidRequestError(
            f"{param} is not an image that can be decoded (PNG, JPEG, WebP, GIF, ...): {exc}",
            param=param,
        ) from exc


def decode_image(data: bytes, param: str) -> Image.Image:
    """A caller's image (chat image parts, edit inputs and masks) loaded with PIL, in its own
    mode; anything PIL cannot read, or too large, is a 400 naming `param`."""
    with opened_image(data, param) as opened:
        opened.load()  # truncated data fails here, not later in a model
        return opened.copy()


def encode_image(image: Any, fmt: str) -> tuple[bytes, str]:
    pil_format, media_type = IMAGE_FORMATS[fmt]
    buffer = io.BytesIO()
    image.save(buffer, format=pil_format)
    return buffer.getvalue(), media_type
