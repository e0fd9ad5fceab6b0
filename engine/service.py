"""The in-process engine: one service per capability, composed here, which every dialect's
routes call as `engine.<capability>.<verb>(request)`. Async at the edge; inference runs on the
shared compute thread, through each model's runner (the chat scheduler, the batcher)."""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3

import torch

from engine.core.access import AccessPolicy
from engine.core.catalog import ModelCatalog
from engine.core.errors import DeadlineExceededError, ModelUnavailableError
from engine.core.manager import ModelManager, check_registry_options
from engine.core.registry import Registry
from engine.core.settings import Settings
from engine.core.sources import is_installed
from engine.embeddings.service import EmbeddingService
from engine.gateway.service import GatewayService
from engine.generation.service import GenerationService
from engine.images.service import ImageService
from engine.jobs import chat as chat_jobs
from engine.jobs.runner import InlineKind, JobRunner
from engine.media.artifacts import ArtifactStore
from engine.ranking.service import RankingService
from engine.runners import make_runner
from engine.speech.service import SpeechService

log = logging.getLogger(__name__)


class Engine:
    """Each capability is a service built from the settings and the model manager (and the
    file store where it keeps files): `generation` (chat, completions), `embeddings`,
    `speech`, `images`, `ranking` (rerank, moderation), `jobs` (video, music, batch chat),
    `files` (generated files), `models` (the catalog), `gateway` (routing, response cache,
    idempotency)."""

    def __init__(self, settings: Settings, manager: ModelManager | None = None):
        self.settings = settings
        self.registry = manager.registry if manager else Registry.from_settings(settings)
        self.manager = manager or ModelManager(settings, self.registry, make_runner)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self._preloading: asyncio.Task[None] | None = None
        self._purging: asyncio.Task[None] | None = None
        self._watching: asyncio.Task[None] | None = None
        self.access = AccessPolicy(settings.accepted_keys(), settings.api_keys_file)
        self.files = ArtifactStore(settings.data_dir / "files", settings.artifact_ttl_s)
        self.models = ModelCatalog(self.manager)
        self.generation = GenerationService(settings, self.manager)
        self.embeddings = EmbeddingService(settings, self.manager)
        self.speech = SpeechService(settings, self.manager, self.files)
        self.images = ImageService(settings, self.manager, self.files)
        self.ranking = RankingService(settings, self.manager)
        self.gateway = GatewayService(settings, self.manager, self.generation.generate,
                                      self.generation.stream)
        self.jobs = JobRunner(settings, self.manager, self.files)
        self.jobs.inline["chat"] = InlineKind(  # chat as a job kind (the /v1/ai/* batch mode)
            validate=chat_jobs.validate,
            run=functools.partial(chat_jobs.run, self.gateway.cache, self.generation.generate),
        )

    async def start(self) -> None:
        """Start background work; preloading runs in the background so /health answers
        while models load, and /ready turns 200 when they are done."""
        await asyncio.to_thread(check_registry_options, self.registry)
        await self.manager.start()
        self._preloading = asyncio.create_task(self._preload())
        await self.jobs.start()
        self._purging = asyncio.create_task(self._purge_expired_forever())
        if self.settings.step_timeout_s > 0:
            self._watching = asyncio.create_task(self._watch_steps_forever())

    async def _watch_steps_forever(self) -> None:
        """A compute step that never returns (a hung kernel, a deadlock in a library) must not
        leave its requests hanging: past step_timeout_s they end with 504, and so does each
        request that reaches the model while the step is still stuck."""
        limit = self.settings.step_timeout_s
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            if (stuck := self.manager.compute.stuck(limit)) is None:
                continue
            runner, running = stuck
            log.error("%s: a compute step has run %.0fs (setting step_timeout_s=%.0f); its "
                      "requests end with 504", runner.name, running, limit)
            runner.abandon(DeadlineExceededError(
                f"{runner.name!r}: a compute step has run {running:.0f}s, past "
                f"step_timeout_s ({limit:.0f}s); the model may be stuck"))

    async def _purge_expired_forever(self) -> None:
        """Expired generated files and finished jobs are removed in the background."""
        while True:
            try:
                await self.jobs.purge_expired()
                await asyncio.to_thread(self.files.purge_expired)
            except (OSError, sqlite3.Error) as exc:
                log.warning("purging expired files failed: %s", exc)
            await asyncio.sleep(min(60.0, self.settings.artifact_ttl_s))

    def preload_ids(self) -> list[str]:
        """The preload setting with `defaults` expanded to the installed default models."""
        ids: list[str] = []
        for name in self.settings.preload:
            if name == "defaults":
                ids += [e.id for e in self.registry.entries() if e.default and is_installed(e)]
            else:
                ids.append(name)
        return list(dict.fromkeys(ids))

    async def _preload(self) -> None:
        for name in self.preload_ids():
            try:
                await self.manager.load(name)
            except Exception as exc:  # the others still load and serve
                log.error("preloading %s failed: %s", name, exc)
        ready = [s for s in self.manager.status() if s.state == "ready"]
        log.info("models ready: %s", ", ".join(f"{s.id} ({s.task})" for s in ready) or "none")

    @property
    def preloaded(self) -> bool:
        return self._preloading is not None and self._preloading.done()

    async def wait_preloaded(self) -> None:
        if self._preloading is not None:
            await asyncio.shield(self._preloading)

    def end_in_flight(self) -> None:
        """The drain deadline has passed: every request still running or queued ends now with
        a 503 (streams get an error frame), so shutdown never cuts a response silently."""
        self.manager.end_in_flight(ModelUnavailableError(
            f"The server is shutting down: the drain deadline ({self.settings.drain_timeout_s:g}"
            " s, setting drain_timeout_s) passed before this request finished; retry it."))

    async def stop(self) -> None:
        for task in (self._preloading, self._purging, self._watching):
            if task is not None and not task.done():
                task.cancel()
        await self.jobs.stop()
        await self.manager.stop()
