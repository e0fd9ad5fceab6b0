"""Embeddings through the real `openai` client, on the real packaged MiniLM."""

from __future__ import annotations

import base64
from collections.abc import Callable

import numpy as np
import pytest

from engine.core.settings import Settings
from tests.conftest import Served, serve_in_process

TEXTS = [
    "Machine learning is a subset of artificial intelligence.",
    "Deep learning uses neural networks with many layers.",
    "The weather today is sunny and warm.",
]


def cosine(a: list[float], b: list[float]) -> float:
    va, vb = np.asarray(a), np.asarray(b)
    return float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb)))


async def test_single_string_with_openai_alias(served: Served) -> None:
    response = await served.openai.embeddings.create(
        model="text-embedding-ada-002", input=TEXTS[0], encoding_format="float"
    )
    assert response.model == "text-embedding-ada-002"
    assert len(response.data) == 1
    vector = response.data[0].embedding
    assert len(vector) == 384
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-3)
    assert response.usage.prompt_tokens > 5


async def test_list_keeps_order_and_meaning(served: Served) -> None:
    response = await served.openai.embeddings.create(model="all-minilm-l6-v2", input=TEXTS)
    assert [d.index for d in response.data] == [0, 1, 2]
    vectors = [d.embedding for d in response.data]
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.2
    single = await served.openai.embeddings.create(model="all-minilm-l6-v2", input=TEXTS[2])
    assert cosine(single.data[0].embedding, vectors[2]) > 0.999


async def test_base64_encoding_decodes_to_the_float_vector(served: Served) -> None:
    raw = await served.http.post(
        "/v1/embeddings",
        json={"model": "all-minilm-l6-v2", "input": TEXTS[1], "encoding_format": "base64"},
    )
    assert raw.status_code == 200
    decoded = np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), dtype="<f4")
    floats = await served.openai.embeddings.create(
        model="all-minilm-l6-v2", input=TEXTS[1], encoding_format="float"
    )
    np.testing.assert_allclose(decoded, floats.data[0].embedding, atol=1e-6)


async def test_dimensions_truncate_and_renormalize(served: Served) -> None:
    full = await served.openai.embeddings.create(model="all-minilm-l6-v2", input=TEXTS[0])
    short = await served.openai.embeddings.create(
        model="all-minilm-l6-v2", input=TEXTS[0], dimensions=64
    )
    vector = np.asarray(short.data[0].embedding)
    assert vector.shape == (64,)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-4)
    head = np.asarray(full.data[0].embedding[:64])
    np.testing.assert_allclose(vector, head / np.linalg.norm(head), atol=1e-5)


async def test_token_id_inputs_match_text_inputs(served: Served) -> None:
    by_text = await served.openai.embeddings.create(model="all-minilm-l6-v2", input=TEXTS[0])
    slot = served.app.state.engine.manager.slot("all-minilm-l6-v2")
    ids = slot.adapter.tokenizer(TEXTS[0], add_special_tokens=False).input_ids
    by_ids = await served.openai.embeddings.create(model="all-minilm-l6-v2", input=[ids, ids])
    assert len(by_ids.data) == 2
    assert cosine(by_ids.data[0].embedding, by_text.data[0].embedding) > 0.999


async def test_a_request_with_more_inputs_than_the_queue_holds_is_served(
    make_settings: Callable[..., Settings],
) -> None:
    """Sent in slices of half the queue, not refused with 429 however long it waited."""
    async with serve_in_process(make_settings(max_queue_per_model=16)) as small_queue:
        texts = [f"sentence number {i}" for i in range(40)]
        reply = await small_queue.openai.embeddings.create(
            model="text-embedding-ada-002", input=texts
        )
    assert [d.index for d in reply.data] == list(range(40))
