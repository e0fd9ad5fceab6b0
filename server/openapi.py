"""The OpenAPI document ember publishes, made to say what the server does: FastAPI's 422
becomes the 400 ember answers, every operation lists the errors it can answer in its
dialect's envelope, and each 2xx names the media types it is sent as (SSE, audio, files).
Field constraints the engine enforces with its own messages are published by the schemas
with `Published`, which changes the schema only, never validation or error bodies."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import Field

from engine.core.audio_codec import MEDIA_TYPES
from server.errors import ENVELOPE_SCHEMAS, Envelope, envelope_for, openai_envelope


def Published(**constraints: Any) -> Any:  # reads as a type inside `Annotated`
    """JSON Schema keywords for the published schema only (the engine checks them)."""
    return Field(json_schema_extra=constraints)


NonEmpty = Annotated[str, Published(minLength=1)]  # "" is a 400
NonBlank = Annotated[str, Published(pattern=r"\S")]  # "" and whitespace only are 400s
AT_LEAST_ONE = Published(minItems=1)  # [] is a 400
JSON_EXACT = 2**53  # the largest integer every JSON reader holds exactly
TokenIds = Annotated[list[Annotated[int, Published(minimum=0)]], AT_LEAST_ONE]

STRING = {"type": "string"}
NULLABLE_STRING = {"type": ["string", "null"]}


def closed_object(required: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": list(required), "properties": required,
            "additionalProperties": False}


# OpenAI's envelope (server/errors.py, the default); each other dialect registers its own
# with server.errors.register_envelope.
OPENAI_ERROR = ("OpenAIError", closed_object({"error": closed_object({
    "message": STRING, "type": STRING, "param": NULLABLE_STRING, "code": NULLABLE_STRING,
    "request_id": STRING})}))


def envelope_schemas() -> dict[Envelope, tuple[str, dict[str, Any]]]:
    return {openai_envelope: OPENAI_ERROR, **ENVELOPE_SCHEMAS}


ERRORS = {
    400: "A field is missing or holds a value ember cannot accept (ember never answers 422)",
    401: "No API key, or an unknown one",
    403: "The key may not use this model, route or organisation",
    404: "No such model, file or job",
    409: "Clashes with the current state: an idempotency key reused for another request, a "
         "model that is serving, a job with no file yet",
    413: "The body is over max_body_bytes",
    429: "A model's queue is full or the key is over a limit; Retry-After says when to retry",
    500: "The model failed on this request's batch, or a bug in ember",
    501: "Announced but not built yet",
    503: "The model is not installed, failed to load or is out of memory; or the server is "
         "shutting down",
    504: "The work ran past its deadline and was stopped",
}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}}

JSON, SSE, TEXT = "application/json", "text/event-stream", "text/plain"
AUDIO = tuple(dict.fromkeys(MEDIA_TYPES.values()))
FILES = ("image/*", "audio/*", "video/*")
BINARY = {"type": "string", "format": "binary"}

MODEL = (404, 503, 504)  # runs a model: unknown id; not installed or not loadable; deadline
JOB = (202, 404, 409, 503)  # queues a job: 202 new, 200 the idempotency key's own job
# Paths behind the API key (401, 403, and 429 for the key's limits), where a 500 may also be.
GUARDED = ("/v1/", "/api/v3/")

# "METHOD path" -> (statuses beyond 400/401/403/413/429/500, 2xx media types). Every route
# must be listed (tests/integration/test_openapi_fuzz.py checks).
OPERATIONS: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {
    "POST /v1/chat/completions": (MODEL, (JSON, SSE)),
    "POST /v1/completions": (MODEL, (JSON, SSE)),
    "POST /v1/embeddings": (MODEL, (JSON,)),
    "POST /v1/audio/transcriptions": (MODEL, (JSON, TEXT, SSE)),
    "POST /v1/audio/translations": (MODEL, (JSON, TEXT, SSE)),
    "POST /v1/audio/speech": (MODEL, (*AUDIO, SSE)),
    "GET /v1/audio/voices": ((), (JSON,)),
    "POST /v1/images/generations": (MODEL, (JSON,)),
    "POST /v1/images/edits": (MODEL, (JSON,)),
    "POST /v1/images/variations": (MODEL, (JSON,)),
    "GET /v1/files/{file_id}": ((404,), (JSON,)),
    "GET /v1/files/{file_id}/content": ((404,), FILES),
    "GET /v1/models": ((), (JSON,)),
    "GET /v1/models/{model_id}": ((404,), (JSON,)),
    "POST /v1/models/load": (MODEL, (JSON,)),
    "POST /v1/models/unload": ((404, 409), (JSON,)),
    "POST /v1/video/generations": (JOB, (JSON,)),
    "POST /v1/music/generations": (JOB, (JSON,)),
    "GET /v1/generations": ((), (JSON,)),
    "GET /v1/generations/{job_id}": ((404,), (JSON,)),
    "POST /v1/generations/{job_id}/cancel": ((404,), (JSON,)),
    "DELETE /v1/generations/{job_id}": ((404,), (JSON,)),
    "GET /v1/generations/{job_id}/content": ((404, 409), FILES),
    "POST /v1/rerank": (MODEL, (JSON,)),
    "POST /v1/moderations": (MODEL, (JSON,)),
    "POST /v1/ai/chat": ((*MODEL, 202, 409), (JSON, SSE)),
    "GET /v1/ai/jobs/{job_id}": ((404,), (JSON,)),
    "POST /v1/ai/embed": ((*MODEL, 409), (JSON,)),
    "POST /v1/ai/image": (MODEL, (JSON,)),
    "POST /v1/ai/vision": (MODEL, (JSON,)),
    "POST /v1/ai/tts": (MODEL, (JSON,)),
    "POST /v1/ai/asr": (MODEL, (JSON,)),
    "POST /v1/ai/realtime/token": ((501,), (JSON,)),
    "POST /api/v3/organizations/{organisation}/ai/chat": (MODEL, (JSON,)),
    "POST /api/v3/organizations/{organisation}/ai/chat/stream": (MODEL, (SSE,)),
    "POST /api/v3/organizations/{organisation}/ai/embeddings": (MODEL, (JSON,)),
    "POST /api/v3/organizations/{organisation}/ai/image-generation": (MODEL, (JSON,)),
    "GET /health": ((), (JSON,)),
    "GET /ready": ((503,), (JSON,)),
    "GET /metrics": ((401,), (TEXT,)),  # 401 when guard_metrics_and_docs and a key is set
}


QUEUED = "A new job, queued (200: the job this idempotency key made before)"
# Non-2xx statuses that answer with the operation's own body, not an error envelope.
OWN_BODY = {("GET /ready", 503): "Still loading: not every preloaded model is ready yet"}


def _content(media_types: tuple[str, ...], schema: dict[str, Any]) -> dict[str, Any]:
    """JSON keeps the schema FastAPI made; SSE frames are not described; the rest is bytes."""
    content: dict[str, Any] = {}
    for media_type in media_types:
        if media_type == JSON:
            content[media_type] = {"schema": schema}
        elif media_type == SSE:
            content[media_type] = {}
        else:
            content[media_type] = {"schema": STRING if media_type == TEXT else BINARY}
    return content


def _operation(path: str, method: str, operation: dict[str, Any]) -> None:
    label = f"{method.upper()} {path}"
    extra, media_types = OPERATIONS.get(label, ((), (JSON,)))
    responses = operation["responses"]
    responses.pop("422", None)
    schema = responses["200"].get("content", {}).get(JSON, {}).get("schema", {})
    responses["200"]["content"] = _content(media_types, schema)
    statuses = set(extra)
    if operation.get("parameters") or operation.get("requestBody"):
        statuses.add(400)
    if operation.get("requestBody"):
        statuses.add(413)
    if path.startswith(GUARDED):
        statuses |= {401, 403, 429, 500}
    envelope, _ = envelope_schemas()[envelope_for(path)]
    for status in sorted(statuses):
        if status == 202:
            responses["202"] = {"description": QUEUED, "content": _content((JSON,), schema)}
        elif (label, status) in OWN_BODY:
            responses[str(status)] = {"description": OWN_BODY[label, status],
                                      "content": _content(media_types, schema)}
        else:
            responses[str(status)] = {
                "description": ERRORS[status],
                "content": {JSON: {"schema": {"$ref": f"#/components/schemas/{envelope}"}}},
                **({"headers": RETRY_AFTER} if status == 429 else {})}


def truthful(schema: dict[str, Any]) -> dict[str, Any]:
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            _operation(path, method, operation)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    components.update(dict(envelope_schemas().values()))
    return schema


def install_openapi(app: FastAPI) -> None:
    """`app.openapi()` (and /openapi.json) serves the truthful document, built once."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = truthful(get_openapi(
                title=app.title, version=app.version, routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
