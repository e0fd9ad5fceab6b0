"""What the gateway dialects add to the engine: the task/prefer routing table, the response
cache, idempotency keys, chat job params, and the QuantCDN mask and strength mappings."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from engine.contracts.chat import (
    ChatMessage,
    Choice,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    TextDelta,
    Usage,
)
from engine.core.errors import ConflictError, InvalidRequestError, RequestCancelledError
from engine.core.manager import ModelManager, ModelState
from engine.core.registry import ModelEntry, Registry
from engine.core.settings import Settings
from engine.gateway.cache import IdempotencyStore, ResponseCache, TTLStore
from engine.gateway.routing import Router, RouteTable
from engine.jobs import chat as chat_jobs
from engine.jobs.runner import _until_cancelled
from engine.runners import make_runner
from server.quantcdn import translate as quant
from server.quantcdn.schemas import ImageGenerationIn

# -- routing -----------------------------------------------------------------------------------


def chat_entry(root: Path, name: str, weight_bytes: int | None, **fields: Any) -> ModelEntry:
    folder = root / name
    folder.mkdir()
    if weight_bytes is not None:
        (folder / "model.safetensors").write_bytes(b"\0" * weight_bytes)
    return ModelEntry(id=name, task="chat", adapter="models.chat:TransformersChat",
                      source=str(folder), **fields)


@pytest.fixture
def router(tmp_path: Path) -> Iterator[Router]:
    registry = Registry([
        chat_entry(tmp_path, "medium", 2000, default=True, aliases=["house-model"]),
        chat_entry(tmp_path, "small", 1000),
        chat_entry(tmp_path, "large", 3000),
        chat_entry(tmp_path, "empty", None),  # a folder without weights: never picked
        ModelEntry(id="hub-only", task="chat", adapter="models.chat:TransformersChat",
                   source="nobody/not-downloaded-anywhere"),
    ])
    manager = ModelManager(Settings(preload=[]), registry, make_runner)
    rules = {"balanced": "first", "cheapest": "smallest", "smartest": "largest"}
    tables = {"chat": RouteTable(tasks={"general": ["*"], "coding": ["large", "*"],
                                        "tiny": ["hub-only"]}, prefer=rules)}
    yield Router(registry, manager, tables)
    manager.compute.close()


def test_prefer_picks_by_weight_size_and_task_lists_order(router: Router) -> None:
    assert router.pick("chat", "general", "balanced") == "medium"  # `*` puts the default first
    assert router.pick("chat", "general", "cheapest") == "small"
    assert router.pick("chat", "general", "smartest") == "large"
    assert router.pick("chat", "coding", "balanced") == "large"
    # Nothing installed for the task: the default model answers (and says what is missing).
    assert router.pick("chat", "tiny", "cheapest") == "medium"
    router.manager.slot("small").state = ModelState.FAILED  # a model that failed to load
    assert router.pick("chat", "general", "cheapest") == "medium"


def test_unknown_task_or_prefer_is_a_400_naming_it(router: Router) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        router.pick("chat", "poetry", "balanced")
    assert caught.value.param == "task" and "general" in caught.value.message
    with pytest.raises(InvalidRequestError) as caught:
        router.pick("chat", "general", "fastest")
    assert caught.value.param == "prefer"


def test_the_packaged_table_loads_and_routes_to_the_default_chat_model() -> None:
    settings = Settings(preload=[])
    registry = Registry.from_settings(settings)
    manager = ModelManager(settings, registry, make_runner)
    try:
        routed = Router.from_settings(settings, registry, manager)
        assert set(routed.tables) == {"chat", "vision", "image"}
        assert set(routed.tables["chat"].tasks) == {"general", "reasoning", "coding",
                                                    "long_context"}
        assert routed.pick("chat", "coding", "smartest") == "smollm2-135m-instruct"
    finally:
        manager.compute.close()


def test_gateway_model_ids_are_aliases_of_the_packaged_models() -> None:
    registry = Registry.from_settings(Settings(preload=[]))
    assert registry.resolve("amazon.nova-lite-v1:0", "chat").id == "smollm2-135m-instruct"
    assert registry.resolve("amazon.titan-embed-text-v2:0", "embedding").id == "all-minilm-l6-v2"
    assert registry.resolve("amazon.nova-canvas-v1:0", "image").id == "sd-turbo"


# -- response cache and idempotency ------------------------------------------------------------


def request(temperature: float, text: str = "hi", model: str = "medium") -> GenerationRequest:
    return GenerationRequest(model=model, params=SamplingParams(temperature=temperature,
                                                                max_tokens=4),
                             messages=[ChatMessage("user", text)])


def result(text: str, finish: Any = "stop") -> GenerationResult:
    return GenerationResult("medium", [Choice(0, text, finish)], Usage(3, 2))


async def test_cache_policies_keys_and_expiry(router: Router) -> None:
    cache = ResponseCache(router.registry, ttl_s=0.2, max_entries=8)
    calls: list[str] = []

    async def generate(req: GenerationRequest) -> GenerationResult:
        calls.append(req.messages[0].content if req.messages else "")
        return result(f"reply {len(calls)}")

    greedy = request(0)
    assert (await cache.generate(greedy, "deterministic", generate))[1] is False
    hit, was_hit = await cache.generate(request(0, model="house-model"), "deterministic",
                                        generate)
    assert was_hit and hit.choices[0].text == "reply 1"  # an alias shares the entry
    hit.choices[0].text = "changed by a caller"
    assert (await cache.generate(greedy, "deterministic", generate))[0].choices[0].text \
        == "reply 1"
    assert (await cache.generate(request(1.0), "deterministic", generate))[1] is False
    assert (await cache.generate(request(1.0), "deterministic", generate))[1] is False
    assert (await cache.generate(request(1.0), "always", generate))[1] is False
    assert (await cache.generate(request(1.0), "always", generate))[1] is True
    assert (await cache.generate(greedy, "off", generate))[1] is False
    assert cache.key(request(0, "other")) != cache.key(greedy)
    time.sleep(0.25)
    assert (await cache.generate(greedy, "deterministic", generate))[1] is False
    cache.store(cache.key(request(0, "cut")), result("partial", finish="cancelled"))
    assert cache.lookup(cache.key(request(0, "cut"))) is None


async def test_cached_streams_replay_and_record(router: Router) -> None:
    cache = ResponseCache(router.registry, ttl_s=60, max_entries=8)

    async def stream(req: GenerationRequest) -> Any:
        from engine.contracts.chat import ChoiceFinished

        yield TextDelta(0, "Hel")
        yield TextDelta(0, "lo")
        yield ChoiceFinished(0, "stop")
        yield Usage(3, 2)

    hit, events = cache.stream(request(0), "deterministic", stream)
    live = [e async for e in events]
    hit_again, replayed = cache.stream(request(0), "deterministic", stream)
    again = [e async for e in replayed]
    assert not hit and hit_again and len(live) == 4
    assert [type(e).__name__ for e in again] == ["TextDelta", "ChoiceFinished", "Usage"]
    assert again[0] == TextDelta(0, "Hello") and again[-1] == Usage(3, 2)


def test_ttl_store_drops_the_least_recently_used() -> None:
    store: TTLStore[int] = TTLStore(ttl_s=60, max_entries=2)
    store.put("a", 1)
    store.put("b", 2)
    assert store.get("a") == 1
    store.put("c", 3)
    assert store.get("b") is None and store.get("a") == 1 and len(store) == 2


async def test_idempotency_runs_once_refuses_another_request_and_forgets_failures() -> None:
    keys = IdempotencyStore(ttl_s=60, max_entries=8)
    runs: list[int] = []

    async def work() -> dict[str, int]:
        runs.append(1)
        await asyncio.sleep(0.05)
        return {"run": len(runs)}

    together = await asyncio.gather(*(keys.run("k", "digest", work) for _ in range(4)))
    assert together == [{"run": 1}] * 4 and len(runs) == 1
    assert await keys.run("k", "digest", work) == {"run": 1}
    with pytest.raises(ConflictError) as caught:
        await keys.run("k", "other digest", work)
    assert caught.value.param == "idempotency_key" and caught.value.status_code == 409

    async def failing() -> None:
        raise InvalidRequestError("bad")

    with pytest.raises(InvalidRequestError):
        await keys.run("f", "digest", failing)
    assert await keys.run("f", "digest", work) == {"run": 2}  # a failure is not remembered


def test_chat_job_params_round_trip_and_are_checked() -> None:
    original = request(0.5, "batch this")
    params = chat_jobs.job_params(original, "deterministic", 30)
    assert chat_jobs.check(params) is params
    bad = [{**params, "messages": []}, {**params, "params": {"nope": 1}},
           {**params, "cache": "sometimes"}, {**params, "timeout_s": -1}]
    for value in bad:
        with pytest.raises(InvalidRequestError):
            chat_jobs.check(value)


async def test_inline_jobs_stop_when_cancelled() -> None:
    cancel = threading.Event()
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.sleep(60)

    job = asyncio.ensure_future(_until_cancelled(forever(), cancel))
    await started.wait()
    cancel.set()
    with pytest.raises(RequestCancelledError):
        await asyncio.wait_for(job, timeout=2)


# -- QuantCDN mappings -------------------------------------------------------------------------


def test_nova_masks_black_to_repaint_become_transparent() -> None:
    mask = Image.new("L", (8, 8), 255)
    mask.paste(0, (0, 0, 4, 8))
    buffer = io.BytesIO()
    mask.save(buffer, "PNG")
    converted = Image.open(io.BytesIO(quant.black_mask_to_alpha(buffer.getvalue())))
    alpha = converted.getchannel("A")
    assert alpha.getpixel((1, 1)) == 0 and alpha.getpixel((6, 6)) == 255


def test_variation_strength_and_default_guidance() -> None:
    body = ImageGenerationIn.model_validate({
        "taskType": "IMAGE_VARIATION",
        "imageVariationParams": {"images": ["AAAA"], "similarityStrength": 0.7},
    })
    job = quant.image_variation(body)
    assert job.mode == "variation" and job.strength == 0.5 and job.guidance_scale is None
    guided = ImageGenerationIn.model_validate({
        "taskType": "TEXT_IMAGE", "textToImageParams": {"text": "x", "style": "PHOTOREALISM"},
        "imageGenerationConfig": {"cfgScale": 3, "quality": "premium"},
    })
    job = quant.text_to_image(guided)
    assert job.guidance_scale == 3 and job.quality == "hd"
    assert job.prompt == "x, photorealistic photograph"
