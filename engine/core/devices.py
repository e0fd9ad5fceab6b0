"""Device and dtype choice: `auto` means cuda → mps → cpu, and bf16/fp16 on GPUs, bf16 on CPUs
with native bf16 math (AVX512_BF16 / AMX), fp32 elsewhere."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from engine.core.errors import InvalidRequestError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(requested: str) -> str:
    if requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise InvalidRequestError(f"device {requested!r} asked for, but CUDA is not available")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@functools.cache
def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(requested: str, device: str) -> torch.dtype:
    if requested != "auto":
        if requested not in _DTYPES:
            raise InvalidRequestError(f"dtype must be one of {sorted(_DTYPES)} or auto")
        return _DTYPES[requested]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def release_device_memory(device: str) -> None:
    """Give cached allocator blocks back after an unload (the caller has dropped references)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device == "mps" and getattr(torch, "mps", None) is not None:
        torch.mps.empty_cache()
