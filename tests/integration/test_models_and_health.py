"""/v1/models, load/unload, /health, /ready and /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from engine.core.settings import Settings
from tests.conftest import Served, serve_in_process


async def test_list_and_retrieve_models(served: Served) -> None:
    page = await served.openai.models.list()
    ids = {model.id for model in page.data}
    assert {"tiny-chat", "all-minilm-l6-v2", "broken-chat"} <= ids
    model = await served.openai.models.retrieve("gpt-4o-mini")
    assert model.id == "tiny-chat"
    assert model.owned_by == "ember"
    extra = model.model_extra or {}
    assert extra["task"] == "chat" and "gpt-4o-mini" in extra["aliases"]


async def test_load_and_unload_show_in_models(served: Served) -> None:
    loaded = await served.http.post("/v1/models/load", json={"model": "tiny-chat"})
    assert loaded.status_code == 200
    assert loaded.json()["state"] == "ready"
    assert loaded.json()["memory_bytes"] > 0
    unloaded = await served.http.post("/v1/models/unload", json={"model": "tiny-chat"})
    assert unloaded.json()["state"] == "available"
    assert unloaded.json()["memory_bytes"] == 0
    # The next request loads it again on demand.
    reply = await served.openai.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert reply.choices
    assert (await served.http.get("/v1/models/tiny-chat")).json()["state"] == "ready"


async def test_concurrent_requests_share_one_load(make_settings: Callable[..., Settings]) -> None:
    async with serve_in_process(make_settings()) as fresh:
        replies = await asyncio.gather(*[
            fresh.openai.chat.completions.create(
                model="tiny-chat", messages=[{"role": "user", "content": f"Hi {i}"}],
                max_tokens=3, temperature=0, extra_body={"ignore_eos": True},
            )
            for i in range(6)
        ])
        assert all(r.usage and r.usage.completion_tokens == 3 for r in replies)
        status = (await fresh.http.get("/v1/models/tiny-chat")).json()
        assert status["state"] == "ready"
        assert status["active_requests"] == 0 and status["queued_requests"] == 0


async def test_health_ready_and_metrics(make_settings: Callable[..., Settings]) -> None:
    async with serve_in_process(make_settings(preload=["tiny-chat"])) as fresh:
        assert (await fresh.http.get("/health")).json() == {"status": "ok"}
        await fresh.app.state.engine.wait_preloaded()
        ready = await fresh.http.get("/ready")
        assert ready.status_code == 200
        assert ready.json()["models"] == {"tiny-chat": "ready"}
        await fresh.openai.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
        text = (await fresh.http.get("/metrics")).text
        assert 'ember_requests_total{route="/v1/chat/completions",status="200"}' in text
        assert 'ember_generated_tokens_total{model="tiny-chat"}' in text
        assert 'ember_model_loaded{model="tiny-chat"} 1.0' in text


async def test_ready_is_503_while_a_preload_fails(make_settings: Callable[..., Settings]) -> None:
    async with serve_in_process(make_settings(preload=["broken-chat"])) as fresh:
        await fresh.app.state.engine.wait_preloaded()
        ready = await fresh.http.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["models"] == {"broken-chat": "failed"}


async def test_pickled_weights_are_never_loaded(
    make_settings: Callable[..., Settings], tiny_chat_dir: Path, tmp_path: Path,
) -> None:
    """A checkpoint with only a pickle (pytorch_model.bin) is refused with a load error naming
    the model: ember loads safetensors, GGUF, CTranslate2 and ONNX only."""
    import shutil

    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled-chat"
    shutil.copytree(tiny_chat_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    entry = {"id": "pickled-chat", "task": "chat", "adapter": "models.chat:TransformersChat",
             "source": str(pickled), "dtype": "float32"}
    async with serve_in_process(make_settings(models=[entry])) as served:
        response = await served.http.post("/v1/chat/completions", json={
            "model": "pickled-chat", "messages": [{"role": "user", "content": "Hi"}]})
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["code"] == "model_load_failed" and "pickled-chat" in error["message"]
        assert "safetensors" in error["message"]
        ok = await served.http.post("/v1/chat/completions", json={
            "model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 2})
        assert ok.status_code == 200
