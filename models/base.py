"""The small contract every adapter implements: construct from an entry, `load`, `warmup`,
the task's batched call, `unload`."""

from __future__ import annotations

import functools
import gc
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from pydantic import ConfigDict, ValidationError
from safetensors import SafetensorError
from tokenizers import Tokenizer

from engine.contracts.base import AdapterOptions, LoadContext
from engine.contracts.chat import ChatOptions
from engine.core.devices import release_device_memory
from engine.core.errors import EmberError, ModelLoadError
from engine.core.registry import ModelEntry
from engine.core.sources import resolve_source

T = TypeVar("T")


class AnyOptions(AdapterOptions):
    """What an adapter that names no options model of its own takes: any keys, unchecked
    (test doubles). Every adapter of configs/models.yaml names its own."""

    model_config = ConfigDict(extra="allow", frozen=True)


def options_error(entry: ModelEntry, model: type[AdapterOptions],
                  error: ValidationError) -> ModelLoadError:
    """A registry entry's bad `options:`, as a load error naming the entry and each key."""
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            known = ", ".join(model.model_fields) or "none"
            problems.append(f"options.{key} is not an option of {entry.adapter} "
                            f"(its options: {known})")
        else:
            problems.append(f"options.{key}: {item['msg']} (got {item.get('input')!r})")
    return ModelLoadError(f"registry entry {entry.id!r}: {'; '.join(problems)}")


def thread_safe_encoder(tokenizer: Any) -> Tokenizer:
    """A private copy of a fast tokenizer's Rust tokenizer with padding and truncation off.

    The transformers wrapper re-configures padding/truncation on its shared Rust tokenizer per
    call, so encoding on request threads while the compute thread encodes a batch races
    ("expected sequence of length 31 ... got 32"). This copy is never re-configured, and
    encoding with it only reads it.
    """
    encoder = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    encoder.no_padding()
    encoder.no_truncation()
    return encoder


def _from_safetensors(exc: BaseException | None) -> bool:
    """Whether safetensors raised `exc` or what caused it (libraries re-raise it wrapped)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, SafetensorError):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is not whole (its header or data cut short, or not a
    safetensors header at all), or None. Reads the header only."""
    size = path.stat().st_size
    try:
        with path.open("rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            if 8 + length > size:
                return f"its header says it is {length} bytes long; the file has {size}"
            header = json.loads(file.read(length))
        ends = [end for key, info in header.items() if key != "__metadata__"
                for end in info["data_offsets"][1:]]
    except struct.error:
        return f"the file ends inside its header ({size} bytes)"
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        return f"its header cannot be read ({type(exc).__name__})"
    if 8 + length + max(ends, default=0) > size:
        return f"its tensors need {8 + length + max(ends)} bytes; the file has {size}"
    return None


def _corrupt_weights_error(entry: ModelEntry, exc: BaseException) -> ModelLoadError:
    """A clear load error for a safetensors file that will not load, naming the file."""
    try:
        folder = Path(resolve_source(entry))
        files = sorted(folder.rglob("*.safetensors")) if folder.is_dir() else [folder]
    except (EmberError, OSError):
        files = []
    for file in files:
        problem = _safetensors_problem(file)
        if problem:
            return ModelLoadError(
                f"Model {entry.id!r}: weights file {file} is corrupt or truncated: {problem}")
    return ModelLoadError(f"Model {entry.id!r}: a safetensors weights file is corrupt or "
                          f"truncated: {exc}")


def _explaining_corrupt_weights(load: Callable[[Any], None]) -> Callable[[Any], None]:
    @functools.wraps(load)
    def checked_load(self: ModelAdapter) -> None:
        try:
            load(self)
        except EmberError:
            raise
        except Exception as exc:
            if not _from_safetensors(exc):
                raise
            raise _corrupt_weights_error(self.entry, exc) from exc

    return checked_load


class ModelAdapter:
    """Base adapter, a `Backend` (engine/contracts/base.py). Subclasses set `self.model` in
    `load`, add their task's call and name their `options_model`. A safetensors file that
    fails to load (corrupt, truncated) is a ModelLoadError naming the model and the file,
    whichever adapter read it."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "load" in cls.__dict__:
            cls.load = _explaining_corrupt_weights(cls.__dict__["load"])  # type: ignore[assignment]

    options_model: ClassVar[type[AdapterOptions]] = AnyOptions

    options: AdapterOptions  # each adapter narrows it to its `options_model`

    def __init__(self, entry: ModelEntry, context: LoadContext):
        self.entry = entry
        self.context = context
        self.options = self.parsed_options(entry)
        self.model: Any = None

    @classmethod
    def parsed_options(cls, entry: ModelEntry) -> AdapterOptions:
        """The entry's `options:` as this adapter's `options_model`. An unknown key or a value
        of the wrong type is a ModelLoadError naming the entry and the key."""
        try:
            return cls.options_model.model_validate(entry.options)
        except ValidationError as exc:
            raise options_error(entry, cls.options_model, exc) from exc

    def pretrained(self, load: Callable[..., T], path: str | Path,
                   errors: tuple[type[Exception], ...] = (OSError, ValueError),
                   **kwargs: Any) -> T:
        """`load(path, local_files_only=True, trust_remote_code=<the entry's>, **kwargs)`: a
        checkpoint read from the local cache only (a `from_pretrained`, a sentence-transformers
        class). Any of `errors` is a ModelLoadError naming the model and the path."""
        try:
            return load(path, local_files_only=True,
                        trust_remote_code=self.entry.trust_remote_code, **kwargs)
        except errors as exc:
            raise ModelLoadError(f"cannot load {self.entry.id!r} from {path}: {exc}") from exc

    def diffusers_pipeline(self, factory: Any) -> tuple[Any, str]:
        """`factory.from_pretrained` (a diffusers pipeline class) over the entry's folder in the
        load's dtype, safetensors only, its progress bars off; and the folder."""
        path = resolve_source(self.entry)
        pipeline = self.pretrained(
            factory.from_pretrained, path, (OSError, ValueError, ImportError),
            torch_dtype=self.context.dtype, use_safetensors=True,
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline, path

    def load(self) -> None:
        raise NotImplementedError

    def warmup(self) -> None:
        """Run one tiny request so the first user request does not pay for lazy init."""

    def memory_bytes(self) -> int:
        """Bytes the weights occupy; used for the memory budget. A torch module, or a
        diffusers pipeline (its `components` hold the modules)."""
        components = getattr(self.model, "components", None)
        modules = [self.model] if components is None else list(components.values())
        tensors = [t for m in modules if isinstance(m, torch.nn.Module)
                   for t in (*m.parameters(), *m.buffers())]
        return sum(t.numel() * t.element_size() for t in tensors)

    def unload(self) -> None:
        self.model = None
        gc.collect()
        release_device_memory(self.context.device)


class ChatAdapter(ModelAdapter):
    """What both chat backends (models.chat, models.llamacpp) share: one entry may be served by
    either, so they read the same `ChatOptions`, and they set the `ChatBackend` attributes
    when they load."""

    options_model: ClassVar[type[AdapterOptions]] = ChatOptions
    options: ChatOptions
    context_length: int
    vocab_size: int
    eos_ids: frozenset[int]
    kv_capacity: int
    max_sequences: int
