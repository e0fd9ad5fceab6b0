"""Video and music generation as jobs: submit (202 with the job), poll, list, cancel, and
download the result. No request is held open while a job runs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import FileResponse
from pydantic import Field

from engine.contracts.images import MAX_GUIDANCE
from engine.core.registry import Task
from engine.jobs.store import JOB_STATUSES, Job
from server.deps import EngineDep, public_base_url, require_api_key
from server.openai.schemas import WireModel
from server.openapi import JSON_EXACT, NonBlank, Published
from server.responses import JSON

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


# What every video and music model checks when the job is submitted (models/media.py); each
# model adds its own upper limits (duration, fps, steps, prompt length).
Duration = Annotated[float, Published(exclusiveMinimum=0)]
Seed = Annotated[int, Field(ge=0), Published(maximum=JSON_EXACT)]  # <= MAX_SEED, exactly
Guidance = Annotated[float, Published(minimum=0, maximum=MAX_GUIDANCE)]
OneOrMore = Annotated[int, Published(minimum=1)]


class VideoGenerationIn(WireModel):
    model: str | None = None
    prompt: NonBlank
    duration: Duration | None = None
    resolution: str | None = None
    fps: OneOrMore | None = None
    seed: Seed | None = None
    negative_prompt: str | None = None
    num_inference_steps: OneOrMore | None = None
    guidance_scale: Guidance | None = None


class MusicGenerationIn(WireModel):
    model: str | None = None
    prompt: NonBlank
    duration: Duration | None = None
    seed: Seed | None = None
    response_format: Literal["wav", "mp3", "flac"] = "wav"
    guidance_scale: Guidance | None = None


def job_json(job: Job, base_url: str) -> dict[str, Any]:
    result = None
    if job.result:
        result = {**job.result, "url": f"{base_url}/v1/generations/{job.id}/content"}
    return {
        "object": "generation.job", "job_id": job.id, "id": job.id, "kind": job.kind,
        "model": job.model, "provider": "ember", "status": job.status,
        "progress": int(job.progress), "created_at": int(job.created_at),
        "created": int(job.created_at),
        "started_at": int(job.started_at) if job.started_at else None,
        "finished_at": int(job.finished_at) if job.finished_at else None,
        "expires_at": int(job.expires_at) if job.expires_at else None,
        "attempts": job.attempts, "params": job.params, "result": result,
        "error": {"message": job.error} if job.error else None,
    }


def _params(body: WireModel) -> dict[str, Any]:
    """The declared fields that were set (unknown fields are ignored, not passed on)."""
    declared = type(body).model_fields
    return {name: getattr(body, name) for name in declared
            if name != "model" and getattr(body, name) is not None}


async def _submit(task: Task, body: VideoGenerationIn | MusicGenerationIn, request: Request,
                  engine: Any, idempotency_key: str | None) -> Any:
    job, created = await engine.jobs.submit(task, body.model, _params(body), idempotency_key)
    status = 202 if created else 200
    return JSON(job_json(job, public_base_url(request, engine)), status_code=status)


@router.post("/video/generations")
async def video_generations(
    body: VideoGenerationIn, request: Request, engine: EngineDep,
    idempotency_key: str | None = Header(None),
) -> Any:
    return await _submit("video", body, request, engine, idempotency_key)


@router.post("/music/generations")
async def music_generations(
    body: MusicGenerationIn, request: Request, engine: EngineDep,
    idempotency_key: str | None = Header(None),
) -> Any:
    return await _submit("music", body, request, engine, idempotency_key)


@router.get("/generations")
async def list_generations(
    request: Request, engine: EngineDep,
    status: str | None = Query(None, json_schema_extra={"enum": list(JOB_STATUSES)}),
    limit: int = Query(20, json_schema_extra={"minimum": 1, "maximum": 100}),
    after: str | None = None,
) -> Any:
    jobs, has_more = await engine.jobs.page(status, limit, after)
    base = public_base_url(request, engine)
    data = [job_json(job, base) for job in jobs]
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


@router.get("/generations/{job_id}")
async def get_generation(job_id: str, request: Request, engine: EngineDep) -> Any:
    return job_json(await engine.jobs.get(job_id), public_base_url(request, engine))


@router.post("/generations/{job_id}/cancel")
async def cancel_generation(job_id: str, request: Request, engine: EngineDep) -> Any:
    return job_json(await engine.jobs.cancel(job_id), public_base_url(request, engine))


@router.delete("/generations/{job_id}")
async def delete_generation(job_id: str, request: Request, engine: EngineDep) -> Any:
    return job_json(await engine.jobs.cancel(job_id), public_base_url(request, engine))


@router.get("/generations/{job_id}/content")
async def generation_content(job_id: str, engine: EngineDep) -> Any:
    artifact = await engine.jobs.content(job_id)
    return FileResponse(artifact.path, media_type=artifact.media_type, filename=artifact.filename)
