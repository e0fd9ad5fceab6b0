"""ModelManager: loads models on first use (exactly once however many requests arrive),
leases them to requests, unloads idle ones after a TTL and evicts least-recently-used ones to
stay inside a memory budget.

Concurrency: all bookkeeping (states, lease counts, futures) happens on the event loop thread,
so it needs no locks. Loads and unloads run one at a time, each on a short-lived thread (a
thread that ran torch keeps an OpenMP pool; see engine/core/compute.py); inference runs on the one
compute thread. A lease is
taken *before* awaiting a load so that eviction, which skips leased slots, can never unload
a model between its load finishing and its caller using it.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Generic, TypeVar, cast

from engine.contracts.base import Backend, LoadContext
from engine.contracts.chat import SamplingParams
from engine.core import metrics
from engine.core.access import current_caller
from engine.core.backends import BackendChoice, choose_backend
from engine.core.compute import ComputeThread
from engine.core.devices import resolve_device, resolve_dtype
from engine.core.errors import (
    ConflictError,
    EmberError,
    ModelLoadError,
    ModelUnavailableError,
    PermissionDeniedError,
    is_out_of_memory,
)
from engine.core.registry import ModelEntry, Registry, Task
from engine.core.runners import Runner, RunnerFactory
from engine.core.settings import Settings
from engine.core.sources import is_installed

log = logging.getLogger(__name__)

AdapterFactory = Callable[[ModelEntry, LoadContext], Backend]
T = TypeVar("T")
B = TypeVar("B")
R = TypeVar("R")


class ModelState(StrEnum):
    AVAILABLE = "available"
    NOT_INSTALLED = "not_installed"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


def adapter_class(entry: ModelEntry) -> Any:
    """The entry's adapter class, imported lazily from its `module:Class` path."""
    module_name, _, class_name = entry.adapter.partition(":")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(
            f"adapter {entry.adapter!r} of {entry.id!r} cannot be imported: {exc}"
        ) from exc


def check_registry_options(registry: Registry) -> None:
    """Every entry's `options:` against its adapter's options model, at start, so a bad entry
    stops the server then rather than failing its first request. Blocking (imports adapter
    modules): run it off the event loop. An adapter that cannot be imported (an optional
    library missing) is left to its load, which says why."""
    for entry in registry.entries():
        try:
            cls = adapter_class(entry)
        except ModelLoadError:
            continue
        parsed_options = getattr(cls, "parsed_options", None)
        if parsed_options is not None:
            parsed_options(entry)


def import_adapter(entry: ModelEntry, context: LoadContext) -> Backend:
    """The default factory: an instance of the entry's adapter class."""
    adapter: Backend = adapter_class(entry)(entry, context)
    return adapter


async def run_in_fresh_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking call on a new thread that ends with it (see the module docstring)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(value: Any, error: BaseException | None) -> None:
        if future.cancelled():
            return
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)

    def target() -> None:
        try:
            value = fn(*args)
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, value, None)

    threading.Thread(target=target, name=f"ember-{fn.__name__}", daemon=True).start()
    return await future


@dataclass
class ModelSlot:
    entry: ModelEntry
    state: ModelState = ModelState.AVAILABLE
    adapter: Backend | None = None
    loaded_runner: Runner | None = None
    error: str | None = None
    leases: int = 0
    last_used: float = field(default_factory=time.monotonic)
    load_seconds: float | None = None
    memory_bytes: int = 0
    device: str | None = None
    dtype: str | None = None
    backend: str | None = None  # chat: llama.cpp or transformers; encoders: torch, onnx, ...
    backend_note: str | None = None
    loading: asyncio.Task[None] | None = None

    @property
    def runner(self) -> Any:
        """The runner (scheduler or batcher) of a leased, hence READY, slot."""
        if self.loaded_runner is None:
            raise ModelUnavailableError(f"{self.entry.id!r} is not loaded")
        return self.loaded_runner


@dataclass(frozen=True)
class Lease(Generic[B, R]):
    """A loaded model held for one request: its backend as its task's contract and its runner.
    The model cannot be unloaded while the lease is held."""

    entry: ModelEntry
    backend: B
    runner: R


@dataclass(frozen=True)
class ModelStatus:
    id: str
    task: str
    state: str
    aliases: list[str]
    default: bool
    error: str | None
    device: str | None
    dtype: str | None
    memory_bytes: int
    load_seconds: float | None
    active_requests: int
    queued_requests: int
    description: str | None
    license: str | None
    backend: str | None = None
    backend_note: str | None = None
    sampling_defaults: dict[str, Any] | None = None  # chat: what a request gets unless it says


class ModelManager:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        runner_factory: RunnerFactory,
        adapter_factory: AdapterFactory = import_adapter,
    ):
        self.settings = settings
        self.registry = registry
        self._make_runner = runner_factory
        self._factory = adapter_factory
        self._slots: dict[str, ModelSlot] = {e.id: ModelSlot(e) for e in registry.entries()}
        # Loads are memory-heavy: one at a time keeps the budget honest.
        self._loading_lock = asyncio.Lock()
        self.compute = ComputeThread()
        self._reaper: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self.settings.idle_ttl_s > 0 and self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_idle_forever())

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for slot in self._slots.values():
            if slot.state is ModelState.READY:
                await self._unload(slot)
        self.compute.close()

    def end_in_flight(self, error: EmberError) -> None:
        """Fail what every loaded model's runner holds with `error` (between steps); the
        models stay loaded until `stop`."""
        for slot in self._slots.values():
            runner = slot.loaded_runner
            if slot.state is ModelState.READY and runner is not None:
                self.compute.between_steps(functools.partial(runner.shutdown, error))

    # -- leases ------------------------------------------------------------------------------

    @asynccontextmanager
    async def lease(self, name: str, task: Task | None = None) -> AsyncIterator[ModelSlot]:
        """`async with manager.lease("gpt-4o-mini", "chat") as slot:` → a READY slot that
        cannot be unloaded until the block exits."""
        slot = self._slots[self.registry.resolve(name, task).id]
        caller = current_caller.get()
        if caller is not None and not caller.may_use_model({name, slot.entry.id,
                                                            *slot.entry.aliases}):
            raise PermissionDeniedError(f"API key {caller.name!r} may not use model "
                                        f"{slot.entry.id!r}.", param="model")
        slot.leases += 1
        try:
            await self._ensure_loaded(slot)
            yield slot
        finally:
            slot.leases -= 1
            slot.last_used = time.monotonic()

    @asynccontextmanager
    async def lease_as(
        self, name: str, task: Task, backend: type[B], runner: type[R]
    ) -> AsyncIterator[Lease[B, R]]:
        """`async with manager.lease_as(name, "embedding", Embedder, Batcher) as lease:` → the
        model's backend as its task's contract (checked when it loaded) and its runner."""
        async with self.lease(name, task) as slot:
            yield Lease(slot.entry, cast(B, slot.adapter), cast(R, slot.runner))

    async def load(self, name: str) -> ModelSlot:
        async with self.lease(name) as slot:
            return slot

    async def unload(self, name: str) -> None:
        slot = self._slots[self.registry.resolve(name).id]
        if slot.leases:
            raise ConflictError(
                f"{slot.entry.id!r} is serving {slot.leases} request(s); unload it when idle",
                param="model",
            )
        if slot.state is ModelState.READY:
            await self._unload(slot)

    async def _ensure_loaded(self, slot: ModelSlot) -> None:
        if slot.state is ModelState.READY:
            return
        if slot.loading is None:
            slot.loading = asyncio.create_task(self._load(slot))
            # Retrieve the outcome even if every waiter went away, so nothing is left unread.
            slot.loading.add_done_callback(lambda task: task.cancelled() or task.exception())
        # Shield: a caller that goes away must not cancel the load others wait for.
        await asyncio.shield(slot.loading)

    async def _load(self, slot: ModelSlot) -> None:
        entry = slot.entry
        try:
            slot.state, slot.error = ModelState.LOADING, None
            await self._make_room(slot, slot.memory_bytes)
            device = resolve_device(entry.device or self.settings.device)
            dtype = resolve_dtype(entry.dtype or self.settings.dtype, device)
            context = LoadContext(
                device=device, dtype=dtype, models_dir=self.settings.models_dir,
                kv_cache_tokens=entry.limits.kv_cache_tokens or self.settings.kv_cache_tokens,
                max_sequences=entry.limits.max_batch_size, threads=self.settings.llama_threads,
            )
            log.info("loading %s (%s) on %s as %s ...", entry.id, entry.task, device, dtype)
            started = time.perf_counter()
            async with self._loading_lock:
                adapter, choice = await run_in_fresh_thread(self._load_blocking, entry, context)
            slot.load_seconds = time.perf_counter() - started
            slot.adapter, slot.memory_bytes = adapter, adapter.memory_bytes()
            # Chat: llama.cpp or transformers, chosen here; encoders say where they run.
            slot.backend = choice.backend or getattr(adapter, "backend_name", None)
            slot.backend_note = choice.note or getattr(adapter, "backend_note", None)
            slot.device = device
            # llama.cpp runs the GGUF file's own quantized weights.
            slot.dtype = "gguf" if choice.backend == "llama.cpp" else (
                getattr(adapter, "served_dtype", None) or str(dtype).removeprefix("torch."))
            slot.loaded_runner = self._make_runner(entry, adapter, self.settings, self.compute)
            slot.state = ModelState.READY
            metrics.MODEL_LOADED.labels(entry.id).set(1)
            metrics.MODEL_LOAD_SECONDS.labels(entry.id).set(slot.load_seconds)
            log.info("loaded %s in %.1fs (%.0f MB%s)", entry.id, slot.load_seconds,
                     slot.memory_bytes / 2**20, f", on {choice.backend}" if choice.backend else "")
            await self._make_room(slot, 0)
        except Exception as exc:
            if isinstance(exc, EmberError):
                error = exc
            elif is_out_of_memory(exc):
                error = ModelLoadError(f"{entry.id!r} ran out of memory while loading: free "
                                       "memory (unload models) or set memory_budget_mb")
            else:
                error = ModelLoadError(f"{entry.id!r} failed to load: {type(exc).__name__}: {exc}")
            slot.state, slot.error = ModelState.FAILED, error.message
            log.error("loading %s failed: %s", entry.id, error.message, exc_info=exc)
            if error is exc:
                raise
            raise error from exc
        finally:
            slot.loading = None

    def _load_blocking(
        self, entry: ModelEntry, context: LoadContext
    ) -> tuple[Backend, BackendChoice]:
        choice = choose_backend(entry, context.device, context.models_dir)
        if choice.adapter != entry.adapter:
            log.info("%s: serving on %s", entry.id, choice.backend)
            entry = entry.model_copy(update={"adapter": choice.adapter})
        adapter = self._factory(entry, context)
        adapter.load()
        adapter.warmup()
        return adapter, choice

    async def _unload(self, slot: ModelSlot) -> None:
        adapter, runner = slot.adapter, slot.loaded_runner
        slot.adapter, slot.loaded_runner, slot.state = None, None, ModelState.AVAILABLE
        metrics.MODEL_LOADED.labels(slot.entry.id).set(0)
        if runner is not None:  # between steps: a step in progress ends before the model goes
            await asyncio.wrap_future(self.compute.between_steps(runner.shutdown))
        if adapter is not None:
            await run_in_fresh_thread(adapter.unload)
        log.info("unloaded %s", slot.entry.id)

    # -- memory budget and idle TTL ----------------------------------------------------------

    async def _make_room(self, incoming: ModelSlot, incoming_bytes: int) -> None:
        """Evict idle READY models, least recently used first, until the budget holds."""
        budget = self.settings.memory_budget_mb * 2**20
        if budget <= 0:
            return
        while True:
            ready = [s for s in self._slots.values() if s.state is ModelState.READY]
            used = sum(s.memory_bytes for s in ready if s is not incoming) + (
                incoming_bytes or incoming.memory_bytes
            )
            if used <= budget:
                return
            idle = [s for s in ready if s is not incoming and s.leases == 0]
            if not idle:
                if incoming.state is ModelState.READY:
                    await self._unload(incoming)
                raise ModelUnavailableError(
                    f"{incoming.entry.id!r} needs {used / 2**20:.0f} MB with the models in use, "
                    f"over the memory budget of {self.settings.memory_budget_mb:.0f} MB"
                )
            victim = min(idle, key=lambda s: s.last_used)
            log.info("evicting %s to stay inside the memory budget", victim.entry.id)
            await self._unload(victim)

    async def unload_idle(self) -> list[str]:
        ttl = self.settings.idle_ttl_s
        now = time.monotonic()
        expired = [
            s for s in self._slots.values()
            if s.state is ModelState.READY and s.leases == 0 and now - s.last_used >= ttl
        ]
        for slot in expired:
            log.info("unloading %s after %.0fs idle", slot.entry.id, now - slot.last_used)
            await self._unload(slot)
        return [s.entry.id for s in expired]

    async def _reap_idle_forever(self) -> None:
        interval = max(0.05, min(self.settings.idle_ttl_s / 2, 5.0))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.unload_idle()
            except Exception:  # keep reaping; one failed unload must not stop the loop
                log.exception("idle unload failed")

    # -- introspection -----------------------------------------------------------------------

    def slot(self, name: str) -> ModelSlot:
        return self._slots[self.registry.resolve(name).id]

    def status(self) -> list[ModelStatus]:
        return [self._status(slot) for slot in self._slots.values()]

    def status_of(self, name: str) -> ModelStatus:
        return self._status(self.slot(name))

    def _status(self, slot: ModelSlot) -> ModelStatus:
        state = slot.state
        if state is ModelState.AVAILABLE and not is_installed(slot.entry):
            state = ModelState.NOT_INSTALLED
        entry = slot.entry
        return ModelStatus(
            id=entry.id, task=entry.task, state=state.value, aliases=list(entry.aliases),
            default=entry.default, error=slot.error, device=slot.device, dtype=slot.dtype,
            memory_bytes=slot.memory_bytes if slot.state is ModelState.READY else 0,
            load_seconds=slot.load_seconds, active_requests=slot.leases,
            queued_requests=slot.loaded_runner.queued if slot.loaded_runner else 0,
            description=entry.description, license=entry.license,
            backend=slot.backend, backend_note=slot.backend_note,
            sampling_defaults=self._sampling_defaults(slot),
        )

    @staticmethod
    def _sampling_defaults(slot: ModelSlot) -> dict[str, Any] | None:
        """The settled defaults: the registry's `sampling:` block, then (once loaded) the
        checkpoint's generation config, then OpenAI's."""
        if slot.entry.task not in ("chat", "vision"):
            return None
        runner = slot.loaded_runner
        layers = (getattr(runner, "sampling_defaults", None)
                  or [slot.entry.sampling.model_dump(exclude_none=True)])
        settled = asdict(SamplingParams().resolved(*layers))
        return {k: v for k, v in settled.items() if k not in ("seed", "stop", "n", "ignore_eos")}
