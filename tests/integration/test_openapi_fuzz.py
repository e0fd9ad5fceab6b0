"""schemathesis against ember's own /openapi.json: every operation, in-process with the tiny
models, bounded. Each response must be no 5xx (but the documented 503 of a model that is not
installed or cannot load, and the 501 of what is announced but not built), carry a documented
status and media type, and match the schema documented for that status. Schema-valid requests
must be accepted (positive_data_acceptance) wherever the schema can say what ember accepts;
`NOT_SAYABLE` lists the operations where it cannot, and why. No operation is left out.

Bounds: per operation, the coverage phase's boundary cases (about 10 to 370 of them) and
`MAX_EXAMPLES` fuzzed ones, positive and negative; no stateful phase. About 4,100 requests,
1.5 to 2 minutes on 2 cores. What costs compute time is capped before a case is sent (`bounded`:
max_tokens 8, n 2, 80 characters of input, 1 s of music or video), and every other case (by a
checksum of its body, so a replayed case does the same) names an installed model and carries
real audio or image bytes, so the model paths run, not only the 404 of an unknown model.
"""

from __future__ import annotations

import base64
import io
import tempfile
import wave
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from PIL import Image
from schemathesis import Case
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

from engine.core.settings import Settings
from server.app import create_app
from server.openapi import OPERATIONS
from tests.conftest import Served

MAX_EXAMPLES = 15
CHECKS: list[CheckFunction] = [not_a_server_error, status_code_conformance,
                               content_type_conformance, response_schema_conformance,
                               positive_data_acceptance]
CONFIG = SchemathesisConfig.from_dict({
    "phases": {"stateful": {"enabled": False}},
    "request-timeout": 60,
    "max-stream-events": 8,  # a stream is judged by its first events; the rest is cut off
})

# Where a schema-valid request may still be refused, for reasons no JSON Schema states: the
# installed models' own limits, other fields, state, or bytes that must really be media.
MEDIA = "the bytes must decode as real audio or images"
NOT_SAYABLE = {
    "POST /v1/chat/completions": "tool_choice must name one of `tools`; the prompt must fit "
                                 "the model's context",
    "POST /v1/completions": "best_of must equal n; token ids must be in the model's vocabulary",
    "POST /v1/embeddings": "token ids and dimensions are bounded by the model",
    "POST /v1/audio/transcriptions": MEDIA,
    "POST /v1/audio/translations": MEDIA + "; an English-only model cannot translate",
    "POST /v1/audio/speech": "voice must be one of the model's voices (registry data)",
    "POST /v1/images/edits": MEDIA + "; the mask must be a PNG with alpha",
    "POST /v1/images/variations": MEDIA,
    "POST /v1/images/generations": "size: multiples of 8 up to the model's max_side; steps up "
                                   "to its max_steps",
    "POST /v1/video/generations": "resolution, fps, duration and steps are bounded by the model",
    "GET /v1/generations": "`after` must name a job that exists",
    "POST /v1/ai/chat": "some message must hold text; tool_choice must name one of `tools`",
    "POST /v1/ai/embed": "dimensions are bounded by the model",
    "POST /v1/ai/image": "size: multiples of 8 up to the model's max_side",
    "POST /v1/ai/vision": MEDIA + ", or a URL ember may fetch",
    "POST /v1/ai/tts": "voice must be one of the model's voices (registry data)",
    "POST /v1/ai/asr": MEDIA + ", or a URL ember may fetch",
    "POST /api/v3/organizations/{organisation}/ai/chat": "tool names must differ; image "
                                                         "blocks must decode",
    "POST /api/v3/organizations/{organisation}/ai/chat/stream": "tool names must differ; image "
                                                                "blocks must decode",
    "POST /api/v3/organizations/{organisation}/ai/image-generation": "each taskType needs its "
                                                                     "own params; " + MEDIA,
}

# An installed model for each operation that names one (`model`, or QuantCDN's `modelId`).
REAL_MODELS = {
    "/v1/chat/completions": "tiny-chat",
    "/v1/completions": "tiny-chat",
    "/v1/embeddings": "all-minilm-l6-v2",
    "/v1/audio/transcriptions": "whisper-1",
    "/v1/audio/translations": "whisper-base",
    "/v1/audio/speech": "tts-1",
    "/v1/images/generations": "tiny-diffusion",
    "/v1/images/edits": "tiny-diffusion",
    "/v1/images/variations": "tiny-diffusion",
    "/v1/models/load": "tiny-chat",
    "/v1/models/unload": "tiny-chat",
    "/v1/video/generations": "tiny-video",
    "/v1/music/generations": "tiny-music",
    "/v1/rerank": "minilm-biencoder-rerank",
    "/v1/moderations": "profanity-check",
    "/v1/ai/chat": "tiny-chat",
    "/v1/ai/embed": "all-minilm-l6-v2",
    "/v1/ai/image": "tiny-diffusion",
    "/v1/ai/vision": "tiny-chat-sees",
    "/v1/ai/tts": "tts-1",
    "/v1/ai/asr": "whisper-1",
    "/api/v3/organizations/{organisation}/ai/chat": "tiny-chat",
    "/api/v3/organizations/{organisation}/ai/chat/stream": "tiny-chat",
    "/api/v3/organizations/{organisation}/ai/embeddings": "all-minilm-l6-v2",
    "/api/v3/organizations/{organisation}/ai/image-generation": "tiny-diffusion",
}

# Caps on what costs compute time: field -> the largest value sent.
CAPS = {"max_tokens": 8, "max_completion_tokens": 8, "maxTokens": 8, "n": 2,
        "numberOfImages": 2, "num_inference_steps": 2, "duration": 1}
MAX_INPUT_CHARS = 80


def _wav() -> bytes:
    """A quarter second of a 440 Hz tone, 16 kHz mono."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(b"".join(
            int(8000 * ((i // 18) % 2 * 2 - 1)).to_bytes(2, "little", signed=True)
            for i in range(4000)))
    return buffer.getvalue()


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buffer, "PNG")
    return buffer.getvalue()


WAV, PNG = _wav(), _png()


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# Where a request leaves the reply's length out, the model may use its whole context (QuantCDN's
# default is 1024 tokens): those operations get the cap when the field is absent.
LENGTH_FIELDS = {
    "/v1/chat/completions": "max_tokens", "/v1/completions": "max_tokens",
    "/v1/ai/chat": "max_tokens", "/v1/ai/vision": "max_tokens",
    "/api/v3/organizations/{organisation}/ai/chat": "maxTokens",
    "/api/v3/organizations/{organisation}/ai/chat/stream": "maxTokens",
}


def bounded(path: str, body: dict[str, Any]) -> None:
    if path in LENGTH_FIELDS:
        body.setdefault(LENGTH_FIELDS[path], CAPS[LENGTH_FIELDS[path]])
    for field, cap in CAPS.items():
        if _number(body.get(field)) and body[field] > cap:
            body[field] = cap
    if isinstance(body.get("input"), str):  # speech, and texts to embed or moderate
        body["input"] = body["input"][:MAX_INPUT_CHARS]


def real(path: str, body: dict[str, Any]) -> None:
    """An installed model, and real media where the body carries some."""
    body["modelId" if path.startswith("/api/v3/") else "model"] = REAL_MODELS[path]
    if isinstance(body.get("file"), bytes):
        body["file"] = WAV
    if isinstance(body.get("image"), bytes):
        body["image"] = PNG
    if isinstance(audio := body.get("audio"), dict) and "base64" in audio:
        audio["base64"] = base64.b64encode(WAV).decode()
    for image in body.get("images") or []:
        if isinstance(image, dict) and "base64" in image:
            image["base64"] = base64.b64encode(PNG).decode()


def _published() -> dict[str, Any]:
    """The document /openapi.json serves. It is made from the routes alone, whatever the
    models, so the schema is loaded at collection from an app that never starts (its engine
    writes only into a temporary folder); the cases then run on a fresh app each."""
    with tempfile.TemporaryDirectory() as root:
        app = create_app(Settings(preload=[], data_dir=Path(root) / "data",
                                  models_dir=Path(root) / "models"))
        return app.openapi()


PUBLISHED = _published()
schema = schemathesis.openapi.from_dict(PUBLISHED, config=CONFIG)


@pytest.fixture
def ember_app(make_settings: Callable[..., Settings]) -> Any:
    """A fresh app per operation: schemathesis starts its lifespan on the first call and ends
    it when the test ends (its pytest plugin does, in pytest_runtest_teardown)."""
    return create_app(make_settings())


def _allowed_server_error(operation: str, status: int) -> bool:
    """A 503 (the model is not installed, cannot load or does not fit) and a 501 (not built
    yet) are answers the operation documents; any other 5xx is a failure."""
    extra, _ = OPERATIONS[operation]
    return status in (501, 503) and status in extra


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_fuzz(ember_app: Any, case: Case) -> None:
    operation = case.operation.label  # case.method may be a probe (TRACE) of another method
    if isinstance(case.body, dict):
        if case.path in REAL_MODELS and zlib.crc32(repr(case.body).encode()) % 2 == 0:
            real(case.path, case.body)
        bounded(case.path, case.body)
    response = case.call(app=ember_app)
    excluded: list[CheckFunction] = []
    if _allowed_server_error(operation, response.status_code):
        excluded.append(not_a_server_error)
    if operation in NOT_SAYABLE:
        excluded.append(positive_data_acceptance)
    case.validate_response(response, checks=CHECKS, excluded_checks=excluded)


def test_every_operation_is_listed_and_fuzzed() -> None:
    """Every route the app publishes has its errors and media types in server/openapi.py
    (OPERATIONS), and none is excluded from the fuzzing above."""
    published = {f"{method.upper()} {path}" for path, item in PUBLISHED["paths"].items()
                 for method in item}
    assert published == set(OPERATIONS)
    assert set(NOT_SAYABLE) <= published
    # Every one loads as an operation schemathesis can fuzz (none is an invalid schema).
    loaded = [result for result in schema.get_all_operations() if isinstance(result, Ok)]
    assert {result.ok().label for result in loaded} == published


async def test_served_document_is_the_published_one(served: Served) -> None:
    response = await served.http.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document == PUBLISHED
    for path, item in document["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)
            if operation.get("requestBody"):
                assert {"400", "413"} <= set(responses), (method, path)
    assert "HTTPValidationError" not in document["components"]["schemas"]
