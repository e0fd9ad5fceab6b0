"""What is installed and loaded, for /v1/models and the load/unload routes: the model manager
seen from outside, without leases."""

from __future__ import annotations

from engine.core.manager import ModelManager, ModelStatus


class ModelCatalog:
    def __init__(self, manager: ModelManager):
        self._manager = manager

    def list(self) -> list[ModelStatus]:
        return self._manager.status()

    def status(self, name: str) -> ModelStatus:
        return self._manager.status_of(name)

    async def load(self, name: str) -> ModelStatus:
        await self._manager.load(name)
        return self._manager.status_of(name)

    async def unload(self, name: str) -> ModelStatus:
        await self._manager.unload(name)
        return self._manager.status_of(name)
