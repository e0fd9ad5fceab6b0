"""ModelManager: one load for many concurrent requests, leases, idle TTL, LRU eviction inside a
memory budget, isolated load failures, and unloads that really free the model."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine.contracts.base import LoadContext
from engine.core.errors import ConflictError, ModelLoadError, ModelUnavailableError
from engine.core.manager import ModelManager
from engine.core.registry import ModelEntry, Registry
from engine.core.settings import Settings
from engine.runners import make_runner
from models.base import ModelAdapter

MB = 2**20


class CountingAdapter(ModelAdapter):
    """Stands in for a model whose load is slow and whose size is known."""

    loads: dict[str, int] = {}

    def load(self) -> None:
        time.sleep(0.2)
        if self.entry.options.get("fail"):
            raise RuntimeError("weights are corrupt")
        if self.entry.options.get("too_big"):
            raise MemoryError()
        CountingAdapter.loads[self.entry.id] = CountingAdapter.loads.get(self.entry.id, 0) + 1
        self.model = object()

    def memory_bytes(self) -> int:
        return int(self.entry.options["mb"] * MB)


def entry(model_id: str, mb: float = 10, **options: Any) -> ModelEntry:
    # The source only needs to exist: the fake adapter loads nothing from it. A job task:
    # its model needs no runner.
    return ModelEntry(id=model_id, task="video", adapter="unused:Unused",
                      source=str(Path(__file__).parent), options={"mb": mb, **options})


def manager_for(entries: list[ModelEntry], tmp_path: Path, **settings: Any) -> ModelManager:
    CountingAdapter.loads = {}
    values = {"models_dir": tmp_path, "data_dir": tmp_path, "preload": [], **settings}
    return ModelManager(Settings(**values), Registry(entries), make_runner,
                        adapter_factory=CountingAdapter)


def states(manager: ModelManager) -> dict[str, str]:
    return {status.id: status.state for status in manager.status()}


async def test_concurrent_first_requests_load_once(tmp_path: Path) -> None:
    manager = manager_for([entry("a")], tmp_path)

    async def use() -> Any:
        async with manager.lease("a") as slot:
            return slot.adapter

    adapters = await asyncio.gather(*[use() for _ in range(10)])
    assert CountingAdapter.loads == {"a": 1}
    assert len({id(a) for a in adapters}) == 1
    assert manager.status_of("a").active_requests == 0
    await manager.stop()


async def test_idle_ttl_unloads_and_next_use_reloads(tmp_path: Path) -> None:
    manager = manager_for([entry("a")], tmp_path, idle_ttl_s=0.3)
    await manager.start()
    async with manager.lease("a"):
        await asyncio.sleep(0.5)  # leased: never unloaded however long it runs
        assert states(manager)["a"] == "ready"
    await asyncio.sleep(0.8)
    assert states(manager)["a"] == "available"
    async with manager.lease("a"):
        pass
    assert CountingAdapter.loads == {"a": 2}
    await manager.stop()


async def test_lru_eviction_keeps_inside_budget(tmp_path: Path) -> None:
    manager = manager_for([entry("a"), entry("b"), entry("c")], tmp_path, memory_budget_mb=25)
    for name in ("a", "b"):
        async with manager.lease(name):
            pass
    async with manager.lease("a"):  # a is now more recently used than b
        pass
    async with manager.lease("c"):
        pass
    assert states(manager) == {"a": "ready", "b": "available", "c": "ready"}
    await manager.stop()


async def test_leased_models_are_never_evicted(tmp_path: Path) -> None:
    manager = manager_for([entry("a"), entry("b")], tmp_path, memory_budget_mb=15)
    async with manager.lease("a"):
        with pytest.raises(ModelUnavailableError) as caught:
            async with manager.lease("b"):
                pass
        assert "budget" in caught.value.message
        assert states(manager)["a"] == "ready"
    await manager.stop()


async def test_failed_load_is_isolated_and_retried(tmp_path: Path) -> None:
    manager = manager_for([entry("bad", fail=True), entry("good")], tmp_path)
    with pytest.raises(ModelLoadError) as caught:
        async with manager.lease("bad"):
            pass
    assert "weights are corrupt" in caught.value.message
    assert states(manager)["bad"] == "failed"
    async with manager.lease("good") as slot:
        assert slot.adapter is not None
    with pytest.raises(ModelLoadError):  # tried again, not cached forever
        async with manager.lease("bad"):
            pass
    await manager.stop()


async def test_out_of_memory_while_loading_fails_that_model_only(tmp_path: Path) -> None:
    manager = manager_for([entry("huge", too_big=True), entry("good")], tmp_path)
    with pytest.raises(ModelLoadError, match="ran out of memory while loading") as caught:
        async with manager.lease("huge"):
            pass
    assert caught.value.status_code == 503
    assert states(manager)["huge"] == "failed"
    async with manager.lease("good") as slot:
        assert slot.adapter is not None
    await manager.stop()


async def test_unload_refused_while_serving(tmp_path: Path) -> None:
    manager = manager_for([entry("a")], tmp_path)
    async with manager.lease("a"):
        with pytest.raises(ConflictError):
            await manager.unload("a")
    await manager.unload("a")
    assert states(manager)["a"] == "available"
    await manager.stop()


async def test_cancelled_caller_does_not_cancel_the_shared_load(tmp_path: Path) -> None:
    manager = manager_for([entry("a")], tmp_path)

    async def use() -> None:
        async with manager.lease("a"):
            pass

    impatient = asyncio.create_task(use())
    await asyncio.sleep(0.05)
    impatient.cancel()
    await use()
    assert CountingAdapter.loads == {"a": 1}
    assert manager.status_of("a").active_requests == 0
    await manager.stop()


async def test_load_unload_cycles_free_the_real_model(
    make_settings: Callable[..., Settings],
) -> None:
    """Unloading drops every reference: the torch module is garbage-collected each cycle."""
    settings = make_settings()
    manager = ModelManager(settings, Registry.from_file(settings.registry_file),  # type: ignore[arg-type]
                           make_runner)
    for _ in range(3):
        async with manager.lease("tiny-chat") as slot:
            module_ref = weakref.ref(slot.adapter.model)  # type: ignore[union-attr]
            assert slot.memory_bytes > 0
        await manager.unload("tiny-chat")
        gc.collect()
        assert module_ref() is None
    await manager.stop()


def test_adapter_context_is_what_the_manager_decided(tmp_path: Path) -> None:
    context = LoadContext(device="cpu", dtype=__import__("torch").float32, models_dir=tmp_path)
    adapter = CountingAdapter(entry("a"), context)
    assert adapter.context.models_dir == tmp_path
