"""GPU tier: skipped without CUDA; run on a GPU box with `pytest tests/gpu`."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from engine.core.devices import resolve_device, resolve_dtype
from engine.core.settings import Settings
from tests.conftest import serve_in_process

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_auto_device_and_dtype_pick_the_gpu() -> None:
    device = resolve_device("auto")
    assert device == "cuda"
    assert resolve_dtype("auto", device) in (torch.bfloat16, torch.float16)


async def test_chat_and_embeddings_run_on_cuda_and_unload_frees_memory(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(models=[{"id": "tiny-chat", "dtype": "auto", "device": "cuda"}])
    async with serve_in_process(settings) as served:
        reply = await served.openai.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
            temperature=0, extra_body={"ignore_eos": True},
        )
        assert reply.usage is not None and reply.usage.completion_tokens == 8
        status = (await served.http.get("/v1/models/tiny-chat")).json()
        assert status["device"] == "cuda" and status["dtype"] in ("bfloat16", "float16")
        allocated = torch.cuda.memory_allocated()
        await served.http.post("/v1/models/unload", json={"model": "tiny-chat"})
        assert torch.cuda.memory_allocated() < allocated
