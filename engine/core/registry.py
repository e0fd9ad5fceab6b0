"""The model registry: data (configs/models.yaml plus settings overrides), and the one resolver
that turns a model id or alias into an entry."""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.core.errors import InvalidRequestError, ModelNotFoundError, WrongTaskError
from engine.core.settings import Settings

log = logging.getLogger(__name__)

Task = Literal[
    "chat", "embedding", "rerank", "moderation", "stt", "tts", "image", "vision", "video", "music"
]


class ModelLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    context_length: int | None = Field(None, gt=0, description="overrides the model config's")
    max_batch_size: int = Field(32, gt=0)
    max_wait_ms: float = Field(5, ge=0)
    max_queue: int | None = Field(None, gt=0, description="defaults to max_queue_per_model")
    kv_cache_tokens: int | None = Field(None, gt=0, description="defaults to kv_cache_tokens")
    request_timeout_s: float | None = Field(
        None, ge=0, description="longest queue wait before 504; defaults to request_timeout_s")


class SamplingDefaults(BaseModel):
    """A model's own sampling defaults (its model card's values); a field the request sets
    always wins. Unset fields fall back to the checkpoint's generation_config.json, then to
    OpenAI's defaults."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    max_tokens: int | None = Field(None, gt=0)


ChatBackendName = Literal["auto", "transformers", "llama.cpp"]


class ModelEntry(BaseModel):
    """One servable model. `adapter` is an import path (`models.chat:TransformersChat`),
    imported only when the model is loaded."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    id: str
    task: Task
    adapter: str
    source: str = Field(description="local dir | HF repo id | package:NAME[/subdir]")
    gguf_file: str | None = None
    # Chat models: who runs them. `auto` = llama.cpp for a GGUF file when llama-cpp-python is
    # installed and its build passes a decode check, else transformers.
    backend: ChatBackendName = "auto"
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults)
    join: dict[str, list[str]] = Field(
        default_factory=dict,
        description="file name -> parts (package:... paths) concatenated, in order, into it",
    )
    sha256: dict[str, str] = Field(default_factory=dict, description="file name -> SHA-256")
    device: str | None = None
    dtype: str | None = None
    aliases: list[str] = Field(default_factory=list)
    default: bool = False
    limits: ModelLimits = Field(default_factory=ModelLimits)
    options: dict[str, Any] = Field(default_factory=dict, description="adapter-specific")
    trust_remote_code: bool = False
    install_hint: str | None = None
    license: str | None = None
    description: str | None = None


def _read_entries(text: str, origin: str) -> list[dict[str, Any]]:
    data = yaml.safe_load(text) or {}
    raw = data.get("models", []) if isinstance(data, dict) else data
    if not isinstance(raw, list):
        raise InvalidRequestError(f"{origin}: `models` must be a list of entries")
    return raw


class Registry:
    """Entries by id, plus an alias index. Later entries with the same id override earlier ones."""

    def __init__(self, entries: list[ModelEntry]):
        self._entries: dict[str, ModelEntry] = {}
        for entry in entries:
            self._entries[entry.id] = entry
        self._aliases: dict[str, str] = {}
        for entry in self._entries.values():
            for alias in entry.aliases:
                if alias in self._entries:
                    raise InvalidRequestError(f"alias {alias!r} of {entry.id!r} is also a model id")
                self._aliases[alias] = entry.id

    @classmethod
    def from_settings(cls, settings: Settings) -> Registry:
        if settings.registry_file is not None:
            text, origin = settings.registry_file.read_text(), str(settings.registry_file)
        else:
            text = resources.files("configs").joinpath("models.yaml").read_text()
            origin = "configs/models.yaml"
        raw_entries = _read_entries(text, origin) + list(settings.models)
        merged: dict[str, dict[str, Any]] = {}
        for raw in raw_entries:
            if not isinstance(raw, dict) or "id" not in raw:
                raise InvalidRequestError(f"{origin}: every model entry needs an `id`")
            # An override may name only the fields it changes.
            merged[raw["id"]] = {**merged.get(raw["id"], {}), **raw}
        try:
            return cls([ModelEntry(**raw) for raw in merged.values()])
        except ValidationError as exc:
            raise InvalidRequestError(f"invalid model registry ({origin}): {exc}") from exc

    @classmethod
    def from_file(cls, path: Path) -> Registry:
        return cls([ModelEntry(**raw) for raw in _read_entries(path.read_text(), str(path))])

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def ids(self) -> list[str]:
        return list(self._entries)

    def resolve(self, name: str, task: Task | None = None, param: str = "model") -> ModelEntry:
        """Model id or alias → entry. Unknown → 404 naming what exists; wrong task → 400."""
        entry = self._entries.get(name) or self._entries.get(self._aliases.get(name, ""))
        if entry is None:
            candidates = [e.id for e in self._entries.values() if task is None or e.task == task]
            shown = name if len(name) <= 80 else f"{name[:80]}... ({len(name)} characters)"
            raise ModelNotFoundError(  # a huge name is not echoed whole into errors and logs
                f"The model {shown!r} does not exist. Available"
                f"{' ' + task if task else ''} models: {', '.join(candidates) or 'none'}.",
                param=param,
            )
        if task is not None and entry.task != task:
            raise WrongTaskError(
                f"The model {name!r} is a {entry.task} model and cannot serve {task} requests.",
                param=param,
            )
        return entry

    def default_for(self, task: Task) -> ModelEntry | None:
        return next((e for e in self._entries.values() if e.task == task and e.default), None)

    def model_or_default(self, name: str | None, task: Task) -> str:
        """The name a caller sent, or, where the API lets `model` be left out, the task's
        default model's id (404 when the registry has none)."""
        if name:
            return name
        default = self.default_for(task)
        if default is None:
            raise ModelNotFoundError(
                f"No default {task} model is configured; name one in `model`.", param="model"
            )
        return default.id
