"""The QuantCDN dialect (seed 002) driven by the published `quantcdn-client` (its
`AIInferenceApi`, `Configuration(host=...)`). The client speaks urllib3, not ASGI, so the app
runs under uvicorn on a free port in a thread of this process, with tiny models: chat, chat with
an image block, streaming, embeddings single and batch, image generation, organisation-scoped
keys, and bad input answered in QuantCDN's own error envelope."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import quantcdn
from PIL import Image
from quantcdn.exceptions import ApiException
from quantcdn.models.chat_inference_request_messages_inner_content import (
    ChatInferenceRequestMessagesInnerContent as Content,
)
from quantcdn.models.chat_inference_request_messages_inner_content_one_of_inner import (
    ChatInferenceRequestMessagesInnerContentOneOfInner as Block,
)

from engine.core.settings import Settings
from server.app import create_app
from tests.conftest import uvicorn_thread
from tests.integration.test_infrai import png

ORG = "acme"
KEYS = {"acme": ["key-acme"], "globex": ["key-globex"]}
# Gateway model ids onto the tiny models (the packaged registry maps them onto the defaults).
ALIASES = [
    {"id": "tiny-chat-sees", "aliases": ["amazon.nova-lite-v1:0"]},
    {"id": "tiny-chat", "aliases": ["gpt-4o-mini", "gpt-3.5-turbo-instruct",
                                    "amazon.nova-micro-v1:0"]},
    {"id": "all-minilm-l6-v2", "aliases": ["text-embedding-ada-002",
                                           "amazon.titan-embed-text-v2:0"]},
    {"id": "tiny-diffusion", "aliases": ["dall-e-2", "dall-e-3", "amazon.nova-canvas-v1:0"]},
]


@pytest.fixture(scope="module")
def base_url(make_settings: Callable[..., Settings]) -> Iterator[str]:
    with uvicorn_thread(create_app(make_settings(organization_keys=KEYS, models=ALIASES))) as url:
        yield url


@pytest.fixture(scope="module")
def api(base_url: str) -> Iterator[quantcdn.AIInferenceApi]:
    configuration = quantcdn.Configuration(host=base_url, access_token="key-acme")
    with quantcdn.ApiClient(configuration) as client:
        yield quantcdn.AIInferenceApi(client)


def chat_body(content: Any, **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}],
            "modelId": "amazon.nova-micro-v1:0", "maxTokens": 8, "temperature": 0, **fields}


def chat_request(content: Any, **fields: Any) -> quantcdn.ChatInferenceRequest:
    request = quantcdn.ChatInferenceRequest.from_dict(chat_body(content, **fields))
    assert request is not None
    return request


def blocks_request(blocks: list[dict[str, Any]], **fields: Any) -> quantcdn.ChatInferenceRequest:
    """Content blocks built as the client's own models: its `from_dict` drops blocks (the
    oneOf wrapper is left empty), so each block goes through `Block.from_dict`."""
    content = Content(actual_instance=[Block.from_dict(b) for b in blocks])
    request = chat_request("", **fields)
    request.messages = [quantcdn.ChatInferenceRequestMessagesInner(role="user", content=content)]
    return request


def embeddings(body: dict[str, Any]) -> quantcdn.EmbeddingsRequest:
    # The client's methods take its models (validate_call refuses a plain dict).
    request = quantcdn.EmbeddingsRequest.from_dict(body)
    assert request is not None
    return request


def image(body: dict[str, Any]) -> quantcdn.ImageGenerationRequest:
    request = quantcdn.ImageGenerationRequest.from_dict(body)
    assert request is not None
    return request


def refused(call: Callable[[], Any], status: int, param: str | None) -> dict[str, Any]:
    """QuantCDN's envelope: {error: true, message, code, param}."""
    with pytest.raises(ApiException) as caught:
        call()
    assert caught.value.status == status, caught.value.body
    body = json.loads(caught.value.body or "{}")
    assert body["error"] is True and body["message"] and body["param"] == param, body
    return dict(body)


def sse_frames(text: str) -> list[dict[str, Any]]:
    frames = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    return [json.loads(frame) for frame in frames[:-1]]


# -- chat --------------------------------------------------------------------------------------


def test_chat(api: quantcdn.AIInferenceApi) -> None:
    reply = api.chat_inference(ORG, chat_request("Hello there", systemPrompt="Be brief."))
    assert isinstance(reply, quantcdn.ChatInference200Response)
    assert reply.response is not None and reply.response.role == "assistant"
    assert isinstance(reply.response.content, str) and reply.response.tool_use is None
    assert reply.model == "amazon.nova-micro-v1:0" and reply.request_id
    assert reply.finish_reason == "length"
    usage = reply.usage
    assert usage is not None and usage.output_tokens == 8
    assert usage.total_tokens == (usage.input_tokens or 0) + 8


def test_chat_with_an_image_block(api: quantcdn.AIInferenceApi) -> None:
    image = base64.b64encode(png()).decode()
    content: list[dict[str, Any]] = [{"image": {"format": "png", "source": {"bytes": image}}},
                                     {"text": "Image 1: what is in it?"}]
    reply = api.chat_inference(ORG, blocks_request(content, modelId="amazon.nova-lite-v1:0"))
    assert reply.usage is not None and (reply.usage.input_tokens or 0) > 10  # image tokens
    assert reply.usage.output_tokens == 8


def test_streaming_matches_the_buffered_reply(api: quantcdn.AIInferenceApi) -> None:
    body = chat_body("Tell me about rivers.", maxTokens=10)
    buffered = api.chat_inference(ORG, chat_request(body["messages"][0]["content"],
                                                    maxTokens=10))
    stream_body = quantcdn.ChatInferenceStreamRequest.from_dict(body)
    assert stream_body is not None and buffered.response is not None
    text = api.chat_inference_stream(ORG, stream_body)
    frames = sse_frames(text)
    deltas = [f["delta"] for f in frames if "delta" in f]
    assert len(deltas) > 1 and "".join(deltas) == buffered.response.content
    last = frames[-1]
    assert last["finishReason"] == "length" and last["usage"]["outputTokens"] == 10
    assert all(f["model"] == "amazon.nova-micro-v1:0" and f["requestId"] for f in frames)
    # Really streamed: the first frame is readable before the body is complete.
    raw = api.chat_inference_stream_without_preload_content(ORG, stream_body)
    assert raw.headers["content-type"].startswith("text/event-stream")
    first = next(iter(raw.stream(64)))
    assert first.startswith(b"data: {")
    raw.release_conn()


# -- embeddings --------------------------------------------------------------------------------


def test_embeddings_single_as_the_seed_sends_it(api: quantcdn.AIInferenceApi) -> None:
    # The seed's example, verbatim: 1024 dimensions asked of a 384-dimension model.
    result = api.embeddings(ORG, embeddings({
        "input": "The Australian government announced new climate policy",
        "modelId": "amazon.titan-embed-text-v2:0", "dimensions": 1024, "normalize": True,
    }))
    vector = result.embeddings.actual_instance
    assert vector is not None and result.dimension == 384 == len(vector)
    assert abs(float(np.linalg.norm(vector)) - 1) < 1e-4
    assert result.model == "amazon.titan-embed-text-v2:0"
    assert result.usage.input_tokens == result.usage.total_tokens > 0


def test_embeddings_batch_and_defaults_and_smaller_dimensions(
    api: quantcdn.AIInferenceApi,
) -> None:
    texts = ["one", "two", "three"]
    # Only `input`: the client fills modelId, dimensions 1024 and normalize true.
    result = api.embeddings(ORG, embeddings({"input": texts}))
    vectors = np.array(result.embeddings.actual_instance)
    assert vectors.shape == (3, 384) and result.dimension == 384
    short = api.embeddings(ORG, embeddings({"input": texts, "dimensions": 256}))
    assert np.array(short.embeddings.actual_instance).shape == (3, 256)
    assert short.dimension == 256


# -- images ------------------------------------------------------------------------------------


def decode(b64: str | bytes) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_image_generation_as_the_seed_sends_it(api: quantcdn.AIInferenceApi) -> None:
    # The seed's example but 256x256 (the tiny model's limit): 1024x1024 with guidance costs
    # half a minute of CPU even for a toy model.
    result = api.image_generation(ORG, image({
        "taskType": "TEXT_IMAGE",
        "textToImageParams": {"text": "A serene mountain landscape at sunset with snow-capped "
                              "peaks", "negativeText": "blurry, low quality, distorted",
                              "style": "PHOTOREALISM"},
        "imageGenerationConfig": {"width": 256, "height": 256, "quality": "premium",
                                  "numberOfImages": 1, "cfgScale": 7},
        "region": "us-east-1",
    }))
    assert len(result.images) == 1 and result.error is None
    assert decode(result.images[0]).size == (256, 256)


def test_image_generation_several_seeded_variation_and_inpainting(
    api: quantcdn.AIInferenceApi,
) -> None:
    config = {"width": 64, "height": 64, "numberOfImages": 2, "seed": 5}
    boat = {"taskType": "TEXT_IMAGE", "textToImageParams": {"text": "a red boat"},
            "imageGenerationConfig": config}
    first = api.image_generation(ORG, image(boat))
    again = api.image_generation(ORG, image(boat))
    assert len(first.images) == 2 and first.images == again.images  # same seed, same bytes
    source = base64.b64encode(png(size=(64, 64))).decode()
    varied = api.image_generation(ORG, image({
        "taskType": "IMAGE_VARIATION",
        "imageVariationParams": {"images": [source], "similarityStrength": 0.7},
    }))
    assert decode(varied.images[0]).size == (64, 64)
    mask = Image.new("L", (64, 64), 255)
    mask.paste(0, (16, 16, 48, 48))  # black: repaint the middle
    buffer = io.BytesIO()
    mask.save(buffer, "PNG")
    painted = api.image_generation(ORG, image({
        "taskType": "INPAINTING",
        "inPaintingParams": {"image": source, "text": "a window",
                             "maskImage": base64.b64encode(buffer.getvalue()).decode()},
    }))
    assert decode(painted.images[0]).size == (64, 64)


# -- organisation keys -------------------------------------------------------------------------


def test_keys_are_scoped_to_their_organisation(base_url: str) -> None:
    def client(token: str | None) -> quantcdn.AIInferenceApi:
        return quantcdn.AIInferenceApi(quantcdn.ApiClient(
            quantcdn.Configuration(host=base_url, access_token=token)))

    body = embeddings({"input": "hello"})
    assert client("key-globex").embeddings("globex", body).dimension == 384
    refused(lambda: client("key-acme").embeddings("globex", body), 403, "organisation")
    refused(lambda: client("key-wrong").embeddings("acme", body), 401, None)
    refused(lambda: client(None).embeddings("acme", body), 401, None)


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "body", "status", "param"),
    [
        ("chat", chat_body([{"video": {"format": "mp4", "source": {"bytes": "AAAA"}}}]),
         400, "messages[0].content[0].video"),
        ("chat", chat_body([{"document": {"format": "pdf", "name": "a",
                                             "source": {"bytes": "AAAA"}}}]),
         400, "messages[0].content[0].document"),
        ("chat", chat_body([{"image": {"format": "bmp", "source": {"bytes": "AAAA"}}}]),
         400, "messages[0].content[0].image.format"),
        ("chat", chat_body([{"image": {"format": "png", "source": {"bytes": "AAAA"}}}],
                              modelId="amazon.nova-lite-v1:0"),
         400, "messages[0].content[0]"),
        ("chat", chat_body("Hi", responseFormat={"type": "json", "jsonSchema": {
            "type": "array", "uniqueItems": True}}), 400, "responseFormat.jsonSchema"),
        ("chat", chat_body("Hi", responseFormat={"type": "yaml"}), 400, "responseFormat.type"),
        ("chat", chat_body("Hi", toolConfig={"tools": [{"toolSpec": {"name": "x"}}],
                                             "autoExecute": True}), 400,
         "toolConfig.autoExecute"),
        ("chat", chat_body("Hi", toolConfig={"tools": [{"toolSpec": {"name": "x"}}],
                                             "toolChoice": {"tool": {"name": "y"}}}), 400,
         "toolConfig.toolChoice"),
        ("chat", chat_body("Hi", maxTokens=0), 400, "maxTokens"),
        ("chat", chat_body("Hi", modelId="amazon.titan-embed-text-v2:0"), 400, "modelId"),
        ("chat", chat_body("Hi", modelId="anthropic.claude-x"), 404, "modelId"),
        ("chat", {"messages": [{"role": "user", "content": "Hi"}]}, 400, "modelId"),
        ("chat/stream", chat_body("Hi", maxTokens=4000), 400, "maxTokens"),
        ("embeddings", {"input": "x", "normalize": False}, 400, "normalize"),
        ("embeddings", {"input": ["x"] * 101}, 400, "input"),
        ("embeddings", {"input": []}, 400, "input"),
        ("image-generation", {"taskType": "OUTPAINTING"}, 400, "taskType"),
        ("image-generation", {"taskType": "BACKGROUND_REMOVAL"}, 400, "taskType"),
        ("image-generation", {"taskType": "TEXT_IMAGE"}, 400, "textToImageParams.text"),
        ("image-generation", {"taskType": "TEXT_IMAGE", "textToImageParams": {"text": "x"},
                              "imageGenerationConfig": {"width": 100, "height": 64}},
         400, "imageGenerationConfig.width"),
        ("image-generation", {"taskType": "INPAINTING",
                              "inPaintingParams": {"image": "AAAA", "maskPrompt": "the cat"}},
         400, "inPaintingParams.maskPrompt"),
        ("image-generation", {"taskType": "IMAGE_VARIATION",
                              "imageVariationParams": {"images": ["***"]}},
         400, "imageVariationParams.images[0]"),
    ],
)
def test_bad_input_is_answered_in_quantcdns_envelope(
    base_url: str, route: str, body: dict[str, Any], status: int, param: str,
) -> None:
    # Raw HTTP: the client would refuse some of these before sending them.
    response = httpx.post(f"{base_url}/api/v3/organizations/{ORG}/ai/{route}", json=body,
                          headers={"Authorization": "Bearer key-acme"}, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["error"] is True and error["message"] and error["param"] == param, error


def test_refusals_through_the_client_and_still_serving(api: quantcdn.AIInferenceApi) -> None:
    video: list[dict[str, Any]] = [{"video": {"format": "mp4", "source": {"bytes": "AAAA"}}},
                                   {"text": "What?"}]
    message = refused(lambda: api.chat_inference(ORG, blocks_request(video)), 400,
                      "messages[0].content[0].video")["message"]
    assert "video" in message
    outpaint = image({"taskType": "OUTPAINTING", "outPaintingParams": {"image": "AAAA"}})
    refused(lambda: api.image_generation(ORG, outpaint), 400, "taskType")
    usage = api.chat_inference(ORG, chat_request("Hi", maxTokens=2)).usage
    assert usage is not None and usage.output_tokens == 2


# -- structured output and tool use ----------------------------------------------------------

WEATHER_SPEC = {"toolSpec": {"name": "get_weather", "description": "The weather in a city.",
                             "inputSchema": {"json": {
                                 "type": "object",
                                 "properties": {"city": {"type": "string", "maxLength": 12}},
                                 "required": ["city"], "additionalProperties": False}}}}
TIME_SPEC = {"toolSpec": {"name": "get_time", "inputSchema": {"json": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}}


def test_response_format_json_through_the_client(api: quantcdn.AIInferenceApi) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    reply = api.chat_inference(ORG, chat_request(
        "Are you ok?", maxTokens=64, temperature=1,
        responseFormat={"type": "json", "jsonSchema": schema}))
    assert reply.response is not None and reply.response.content is not None
    assert set(json.loads(reply.response.content)) == {"ok"}
    reply = api.chat_inference(ORG, chat_request("Hi", maxTokens=200, temperature=1,
                                                 responseFormat={"type": "json"}))
    assert reply.finish_reason in ("stop", "length")
    assert reply.response is not None and (reply.response.content or "").startswith("{")


def test_tool_config_is_accepted_by_the_client(api: quantcdn.AIInferenceApi) -> None:
    """The published client sends toolConfig.tools (it has no toolChoice): the model may
    answer in text, and the reply parses in the client's models either way."""
    reply = api.chat_inference(ORG, chat_request(
        "Weather in Paris?", maxTokens=16, toolConfig={"tools": [WEATHER_SPEC]}))
    assert reply.finish_reason in ("stop", "length", "tool_use")


def test_tool_use_is_one_object_for_one_call_and_an_array_for_several(base_url: str) -> None:
    """`toolChoice` (Bedrock's, an extension) forces calls; the reply parses in the client's
    own response model, toolUse as an object for one call and an array for several. The
    tiny model makes one call or several at random: sampled until both shapes are seen."""
    shapes: dict[type, Any] = {}
    for _attempt in range(40):
        response = httpx.post(
            f"{base_url}/api/v3/organizations/{ORG}/ai/chat",
            headers={"Authorization": "Bearer key-acme"},
            json=chat_body("Weather?", maxTokens=400, temperature=1, toolConfig={
                "tools": [WEATHER_SPEC, TIME_SPEC], "toolChoice": {"any": {}}}), timeout=60)
        assert response.status_code == 200, response.text
        body = response.json()
        if body["finishReason"] == "length":  # eight calls can outrun maxTokens: cut, whole
            uses = body["response"]["toolUse"]  # calls only
            assert all(set(u["input"]) <= {"city", "zone"} for u in (
                uses if isinstance(uses, list) else [uses] if uses else []))
            continue
        assert body["finishReason"] == "tool_use", body
        parsed = quantcdn.ChatInference200Response.from_dict(body)
        assert parsed is not None and parsed.response is not None
        assert parsed.response.tool_use is not None
        uses = body["response"]["toolUse"]
        shapes[type(uses)] = uses
        if len(shapes) == 2:
            break
    one, several = shapes[dict], shapes[list]
    assert one["name"] in ("get_weather", "get_time") and one["toolUseId"].startswith("call_")
    assert len(several) > 1 and {u["name"] for u in several} <= {"get_weather", "get_time"}
    for use in [one, *several]:
        assert set(use["input"]) == ({"city"} if use["name"] == "get_weather" else {"zone"})
