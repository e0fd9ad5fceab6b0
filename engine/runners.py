"""Which runner serves a loaded model, by task: chat and vision get the continuous-batching
scheduler, batchable tasks get the dynamic `Batcher`, jobs need none. Runners own the model's
queue, limits and thread."""

from __future__ import annotations

from typing import Any

from engine.core.batcher import Batcher
from engine.core.compute import ComputeThread
from engine.core.registry import ModelEntry
from engine.core.runners import JobSlotRunner, Runner
from engine.core.settings import Settings
from engine.generation.scheduler import ChatScheduler


def make_runner(
    entry: ModelEntry, adapter: Any, settings: Settings, compute: ComputeThread
) -> Runner:
    limits = entry.limits
    max_queue = limits.max_queue or settings.max_queue_per_model
    timeout_s = (settings.request_timeout_s if limits.request_timeout_s is None
                 else limits.request_timeout_s)  # per model: an image may wait longer
    if entry.task in ("video", "music"):
        return JobSlotRunner()
    if entry.task in ("chat", "vision"):  # vision models chat too, images or not
        return ChatScheduler(
            adapter, entry.id, compute, max_batch_size=limits.max_batch_size, max_queue=max_queue,
            kv_cache_tokens=limits.kv_cache_tokens or settings.kv_cache_tokens,
            prefill_chunk_tokens=settings.prefill_chunk_tokens,
            timeout_s=timeout_s,
            sampling_defaults=entry.sampling.model_dump(exclude_none=True),
        )
    return Batcher(
        entry.id, adapter.batch, compute, max_batch_size=limits.max_batch_size,
        max_wait_ms=limits.max_wait_ms, max_queue=max_queue, size_of=adapter.size_of,
        timeout_s=timeout_s,
    )
