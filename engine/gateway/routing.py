"""Which model answers a gateway request that names none: seed 001's `task` (what the request is
for) and `prefer` (what to optimise), looked up in a routing table that is data
(configs/routing.yaml, or the `routing_file` setting).

For each kind of model (chat, vision, image) the table lists, per task, the candidate models
(ids or aliases; `*` = every model of that kind, the default one first), and per `prefer` a
rule: `first` (the first candidate in that order), `smallest` or `largest`. Size is the bytes
of the weight files on disk, a stand-in for the parameter count (a quantized file counts at its
quantized size). Only installed models with weights that have not failed to load are
candidates; with none, the kind's default model answers (and says how to install it).
"""

from __future__ import annotations

import logging
import time
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from engine.core.errors import InvalidRequestError
from engine.core.manager import ModelManager, ModelState
from engine.core.registry import ModelEntry, Registry, Task
from engine.core.settings import Settings
from engine.core.sources import is_installed, resolve_source

log = logging.getLogger(__name__)

Rule = Literal["first", "smallest", "largest"]
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".onnx", ".pt", ".pth", ".ckpt")
CANDIDATES_TTL_S = 30.0  # installing a model (`ember pull`) shows up within this long


class RouteTable(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: dict[str, list[str]]
    prefer: dict[str, Rule]


def weight_bytes(entry: ModelEntry) -> int:
    """Bytes of the entry's weight files on disk; 0 when there are none (or it is not
    installed)."""
    try:
        path = Path(resolve_source(entry))
    except Exception:  # not installed, or a source that cannot be read: not a candidate
        return 0
    if path.is_file():
        return path.stat().st_size
    files = [p for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file()]
    return sum(p.stat().st_size for p in files)


class Router:
    def __init__(self, registry: Registry, manager: ModelManager,
                 tables: dict[str, RouteTable]):
        self.registry = registry
        self.manager = manager
        self.tables = tables
        self._candidates: dict[tuple[str, str], tuple[float, list[tuple[ModelEntry, int]]]] = {}

    @classmethod
    def from_settings(cls, settings: Settings, registry: Registry,
                      manager: ModelManager) -> Router:
        if settings.routing_file is not None:
            text, origin = settings.routing_file.read_text(), str(settings.routing_file)
        else:
            text = resources.files("configs").joinpath("routing.yaml").read_text()
            origin = "configs/routing.yaml"
        raw = yaml.safe_load(text) or {}
        if not isinstance(raw, dict):
            raise InvalidRequestError(f"{origin}: the routing table must be a mapping")
        try:
            tables = {kind: RouteTable(**table) for kind, table in raw.items()}
        except (TypeError, ValidationError) as exc:
            raise InvalidRequestError(f"invalid routing table ({origin}): {exc}") from exc
        return cls(registry, manager, tables)

    def pick(self, kind: Task, task: str = "general", prefer: str = "balanced") -> str:
        """The id of the model that serves a `kind` request for `task`, by `prefer`."""
        table = self.tables.get(kind)
        if table is None:
            return self.registry.model_or_default(None, kind)
        if task not in table.tasks:
            raise InvalidRequestError(
                f"task must be one of {', '.join(table.tasks)}; got {task!r}", param="task"
            )
        if prefer not in table.prefer:
            raise InvalidRequestError(
                f"prefer must be one of {', '.join(table.prefer)}; got {prefer!r}", param="prefer"
            )
        candidates = [(e, size) for e, size in self._installed(kind, task)
                      if self.manager.slot(e.id).state is not ModelState.FAILED]
        if not candidates:
            return self.registry.model_or_default(None, kind)
        rule = table.prefer[prefer]
        if rule == "first":
            return candidates[0][0].id
        # Ties go to the earlier candidate (the default model comes first under `*`).
        sign = -1 if rule == "largest" else 1
        order = {entry.id: index for index, (entry, _) in enumerate(candidates)}
        best = min(candidates, key=lambda item: (sign * item[1], order[item[0].id]))
        return best[0].id

    def _installed(self, kind: Task, task: str) -> list[tuple[ModelEntry, int]]:
        """Installed candidates with weights, in table order, and their sizes (cached briefly:
        the check looks at the disk)."""
        cached = self._candidates.get((kind, task))
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        names = self.tables[kind].tasks[task]
        entries: list[ModelEntry] = []
        for name in names:
            if name == "*":
                of_kind = [e for e in self.registry.entries() if e.task == kind]
                entries += sorted(of_kind, key=lambda e: not e.default)
            else:
                entries.append(self.registry.resolve(name, kind, param="task"))
        unique = list({e.id: e for e in entries}.values())
        found = [(e, weight_bytes(e)) for e in unique if is_installed(e)]
        found = [(e, size) for e, size in found if size > 0]
        self._candidates[(kind, task)] = (time.monotonic() + CANDIDATES_TTL_S, found)
        return found
