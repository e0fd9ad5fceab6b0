"""Which backend runs a chat model: the registry entry's `backend` (transformers, llama.cpp,
or auto), decided when the model loads.

`auto` picks llama.cpp for a GGUF file on the CPU when llama-cpp-python is installed and its
build passes a decode check in a child process (a native crash there must never take the
server down: some builds segfault in their first decode on some CPUs); anything else, or any
doubt, is served by transformers, and the reason is logged and shown in /v1/models.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

from engine.core.errors import ModelLoadError
from engine.core.registry import ModelEntry
from engine.core.sources import gguf_path

log = logging.getLogger(__name__)

LLAMA_CPP_ADAPTER = "models.llamacpp:LlamaCppChat"
TRANSFORMERS_ADAPTER = "models.chat:TransformersChat"


@dataclass(frozen=True)
class BackendChoice:
    adapter: str  # import path of the adapter class to load
    backend: str | None  # "llama.cpp" or "transformers" for chat models, else None
    note: str | None = None  # why `auto` did not pick llama.cpp


def _llama_cpp_problem(path: Path, models_dir: Path) -> str | None:
    """None when llama.cpp can serve `path` here, else why not (blocking: may run a child)."""
    try:
        check = importlib.import_module("models.llamacpp_check")
    except ImportError as exc:
        return f"llama.cpp support cannot be imported: {exc}"
    problem: str | None = check.llama_cpp_available()
    if problem is None:
        problem = check.check_build(path, models_dir / "llama-cpp-checks")
    return problem


def choose_backend(entry: ModelEntry, device: str, models_dir: Path) -> BackendChoice:
    if entry.task != "chat":
        return BackendChoice(entry.adapter, None)
    if entry.backend == "transformers":
        return BackendChoice(entry.adapter, "transformers")
    path = gguf_path(entry, models_dir)
    if entry.backend == "llama.cpp":
        if path is None:
            raise ModelLoadError(f"{entry.id!r}: backend llama.cpp needs a GGUF file "
                                 "(`gguf_file`, or a `.gguf` source)")
        problem = _llama_cpp_problem(path, models_dir)
        if problem:
            raise ModelLoadError(f"{entry.id!r}: llama.cpp cannot serve it: {problem}")
        return BackendChoice(LLAMA_CPP_ADAPTER, "llama.cpp")
    # auto
    if path is None:
        return BackendChoice(entry.adapter, "transformers")
    if device != "cpu":
        return BackendChoice(entry.adapter, "transformers",
                             f"on {device} transformers is used (ember's llama.cpp is a CPU build)")
    problem = _llama_cpp_problem(path, models_dir)
    if problem:
        note = f"llama.cpp not used: {problem}; serving on transformers (slower)"
        log.warning("%s: %s", entry.id, note)
        return BackendChoice(entry.adapter, "transformers", note)
    return BackendChoice(LLAMA_CPP_ADAPTER, "llama.cpp")
