"""The gateway dialects on `ember serve` as a real process with the packaged default chat and
embedding models: the published `quantcdn-client` against /api/v3/organizations/... (gateway
model ids resolved by the packaged aliases, keys scoped by organisation), and /v1/ai/* over
HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import quantcdn
from quantcdn.exceptions import ApiException

from tests.e2e.process import ember_serve

pytestmark = pytest.mark.e2e
KEYS = {"acme": ["acme-key"], "globex": ["globex-key"]}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log_path = tmp_path_factory.mktemp("gateways") / "ember.log"
    env = {"EMBER_DATA_DIR": str(log_path.parent / "data"),
           "EMBER_PRELOAD": "smollm2-135m-instruct,all-minilm-l6-v2",
           "EMBER_ORGANIZATION_KEYS": json.dumps(KEYS)}
    with ember_serve(log_path, env) as (base, _):
        yield base


def api(base: str, token: str) -> quantcdn.AIInferenceApi:
    return quantcdn.AIInferenceApi(quantcdn.ApiClient(
        quantcdn.Configuration(host=base, access_token=token)))


def test_quantcdn_client_chat_stream_and_embeddings(server: str) -> None:
    client = api(server, "acme-key")
    request = quantcdn.ChatInferenceRequest.from_dict({
        "messages": [{"role": "user", "content": "Which city is the capital of France?"}],
        "modelId": "amazon.nova-lite-v1:0", "maxTokens": 24, "temperature": 0,
    })
    assert request is not None
    reply = client.chat_inference("acme", request)
    assert reply.response is not None and "Paris" in (reply.response.content or "")
    assert reply.model == "amazon.nova-lite-v1:0" and reply.finish_reason in ("stop", "length")
    stream_request = quantcdn.ChatInferenceStreamRequest.from_dict(request.to_dict())
    assert stream_request is not None
    frames = [json.loads(line[6:]) for line in client.chat_inference_stream(
        "acme", stream_request).splitlines() if line.startswith("data: {")]
    assert "".join(f.get("delta", "") for f in frames) == reply.response.content
    vectors = client.embeddings("acme", quantcdn.EmbeddingsRequest.from_dict(
        {"input": ["cats purr", "dogs bark"]}))  # type: ignore[arg-type]
    assert vectors.dimension == 384 and vectors.model == "amazon.titan-embed-text-v2:0"
    with pytest.raises(ApiException) as caught:
        api(server, "globex-key").embeddings("acme", quantcdn.EmbeddingsRequest.from_dict(
            {"input": "x"}))  # type: ignore[arg-type]
    assert caught.value.status == 403


def test_infrai_chat_and_embed(server: str) -> None:
    reply = httpx.post(f"{server}/v1/ai/chat", json={
        "messages": "Which city is the capital of France?", "max_tokens": 24, "temperature": 0,
        "prefer": "cheapest",
    }, timeout=120).json()
    assert "Paris" in reply["content"], reply
    assert reply["metadata"]["model"] == "smollm2-135m-instruct"
    assert reply["metadata"]["vendor"] == "ember"
    embedded = httpx.post(f"{server}/v1/ai/embed", json={"input": "raccoons"}, timeout=60).json()
    assert len(embedded["embeddings"][0]) == 384
