"""QuantCDN wire <-> engine types. Pure functions apart from decoding a mask image (PIL), which
the route runs off the event loop."""

from __future__ import annotations

import base64
import binascii
import io
import json
import uuid
from typing import Any

import numpy as np
from PIL import Image

from engine.contracts.chat import (
    ChatMessage,
    GenerationRequest,
    GenerationResult,
    ImageInput,
    OutputConstraint,
    ResponseFormat,
    SamplingParams,
    ToolCall,
    ToolSpec,
    Usage,
)
from engine.contracts.images import ImageMode, ImageRequest
from engine.core.errors import InvalidRequestError, UnsupportedFeatureError
from engine.core.image_codec import decode_image
from server.quantcdn.schemas import ChatIn, ImageGenerationConfig, ImageGenerationIn

IMAGE_FORMATS = ("png", "jpeg", "gif", "webp")
MAX_EMBEDDING_INPUTS = 100  # the gateway's batch limit
# The published client sends cfgScale 6.5 (Nova's default) on every request that has an
# imageGenerationConfig, and Nova's range (1.1-10) cannot say "no guidance", which distilled
# models (sd-turbo) need: 6.5 therefore means "the model's own default guidance".
GATEWAY_DEFAULT_CFG = 6.5
# Nova Canvas style presets, said in the prompt (diffusion models take style as words).
STYLE_WORDS = {
    "3D_ANIMATED_FAMILY_FILM": "3D animated family film style",
    "DESIGN_SKETCH": "design sketch",
    "FLAT_VECTOR_ILLUSTRATION": "flat vector illustration",
    "GRAPHIC_NOVEL_ILLUSTRATION": "graphic novel illustration",
    "MAXIMALISM": "maximalist style",
    "MIDCENTURY_RETRO": "mid-century retro style",
    "PHOTOREALISM": "photorealistic photograph",
    "SOFT_DIGITAL_PAINTING": "soft digital painting",
}
UNSUPPORTED_TASKS = {
    "OUTPAINTING": "outpainting (extending an image past its borders)",
    "BACKGROUND_REMOVAL": "background removal (it needs a segmentation model)",
    "COLOR_GUIDED_GENERATION": "color-guided generation",
    "VIRTUAL_TRY_ON": "virtual try-on",
}


def new_request_id() -> str:
    return str(uuid.uuid4())


# -- chat --------------------------------------------------------------------------------------


def _block(block: dict[str, Any], where: str) -> str | ImageInput:
    """One content block: `{text}` or `{image: {format, source: {bytes}}}`; video and
    document blocks are refused (ember reads neither)."""
    if isinstance(block.get("text"), str):
        return str(block["text"])
    image = block.get("image")
    if isinstance(image, dict):
        fmt = image.get("format")
        if fmt not in IMAGE_FORMATS:
            raise InvalidRequestError(
                f"image format must be one of {', '.join(IMAGE_FORMATS)}; got {fmt!r}",
                param=f"{where}.image.format",
            )
        source = image.get("source")
        data = source.get("bytes") if isinstance(source, dict) else None
        if not isinstance(data, str) or not data.strip():
            raise InvalidRequestError("image.source.bytes must be base64-encoded image data",
                                      param=f"{where}.image.source.bytes")
        return ImageInput(url=f"data:image/{fmt};base64,{data.strip()}",
                          param=f"{where}.image.source.bytes", part=where)
    for kind in ("video", "document"):
        if kind in block:
            raise UnsupportedFeatureError(
                f"{kind} content blocks are not supported by this server: ember's vision "
                "models read images only. Send text or image blocks.",
                param=f"{where}.{kind}",
            )
    raise InvalidRequestError(
        "a content block must hold one of text, image, video or document", param=where
    )


def _message(role: str, content: str | list[dict[str, Any]], index: int) -> ChatMessage:
    if isinstance(content, str):
        return ChatMessage(role=role, content=content)
    parts = [_block(b, f"messages[{index}].content[{j}]") for j, b in enumerate(content)]
    text = "\n".join(p for p in parts if isinstance(p, str))
    has_images = any(isinstance(p, ImageInput) for p in parts)
    return ChatMessage(role=role, content=text, parts=tuple(parts) if has_images else ())


def chat_request(body: ChatIn) -> GenerationRequest:
    if body.tool_config is not None and body.tool_config.auto_execute:
        raise UnsupportedFeatureError(
            "ember does not run tools itself (autoExecute); it returns toolUse for the caller "
            "to run. Set autoExecute to false.",
            param="toolConfig.autoExecute",
        )
    messages = [_message(m.role, m.content, i) for i, m in enumerate(body.messages)]
    if body.system_prompt:
        messages.insert(0, ChatMessage(role="system", content=body.system_prompt))
    params = SamplingParams(
        max_tokens=body.max_tokens, temperature=body.temperature,
        top_p=body.top_p, stop=list(body.stop_sequences or []),
    )
    return GenerationRequest(model=body.model_id, params=params, messages=messages,
                             request_id=new_request_id(), constraint=constraint(body))


def constraint(body: ChatIn) -> OutputConstraint | None:
    """toolConfig.tools (the model chooses text or calls) and responseFormat."""
    tools = tuple(
        ToolSpec(t.tool_spec.name, t.tool_spec.description,
                 (t.tool_spec.input_schema.json_ if t.tool_spec.input_schema else None)
                 or {"type": "object"})
        for t in (body.tool_config.tools if body.tool_config else None) or [])
    response_format = None
    if body.response_format is not None and (body.response_format.type is not None
                                             or body.response_format.json_schema is not None):
        schema = body.response_format.json_schema
        response_format = ResponseFormat("json_schema" if schema is not None else "json_object",
                                         schema)
    if response_format is None and not tools:
        return None
    choice = body.tool_config.tool_choice if body.tool_config is not None else None
    return OutputConstraint(
        response_format=response_format, tools=tools,
        tool_choice=choice.choice() if choice is not None else "auto",
        tool_choice_param="toolConfig.toolChoice",
        param="responseFormat.jsonSchema" if response_format is not None
        and response_format.schema is not None else "responseFormat",
        tools_param="toolConfig.tools",
        tool_parameters_param="toolConfig.tools[{index}].toolSpec.inputSchema.json")


def tool_use_json(calls: list[ToolCall]) -> dict[str, Any] | list[dict[str, Any]] | None:
    """One call as an object, several as an array (the seed's two shapes), none as null. A
    call cut off by maxTokens (its input is not whole JSON) is left out: the finishReason
    says `length`."""
    uses = []
    for call in calls:
        try:
            arguments = json.loads(call.arguments or "{}")
        except json.JSONDecodeError:
            continue
        uses.append({"toolUseId": call.id, "name": call.name, "input": arguments})
    if not uses:
        return None
    return uses[0] if len(uses) == 1 else uses


def finish_reason(reason: str | None) -> str | None:
    return "tool_use" if reason == "tool_calls" else reason


# Engine errors name OpenAI's fields; these are the same fields here.
CHAT_PARAMS = {"max_tokens": "maxTokens", "temperature": "temperature", "top_p": "topP",
               "stop": "stopSequences", "model": "modelId"}


def usage_json(usage: Usage) -> dict[str, int]:
    return {"inputTokens": usage.prompt_tokens, "outputTokens": usage.completion_tokens,
            "totalTokens": usage.total_tokens}


def chat_response(body: ChatIn, request_id: str, result: GenerationResult) -> dict[str, Any]:
    choice = result.choices[0]
    return {
        "response": {"role": "assistant", "content": choice.text,
                     "toolUse": tool_use_json(choice.tool_calls)},
        "model": body.model_id, "requestId": request_id,
        "finishReason": finish_reason(choice.finish_reason),
        "usage": usage_json(result.usage),
    }


# -- embeddings --------------------------------------------------------------------------------


def embedding_texts(value: str | list[str], normalize: bool) -> list[str]:
    if not normalize:
        raise UnsupportedFeatureError(
            "ember returns unit-length embeddings only; omit normalize or set it to true.",
            param="normalize",
        )
    texts = [value] if isinstance(value, str) else value
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise InvalidRequestError(
            f"input has {len(texts)} texts; at most {MAX_EMBEDDING_INPUTS} per request",
            param="input",
        )
    return texts


def embeddings_response(model_id: str, single: bool, vectors: np.ndarray,
                        tokens: int) -> dict[str, Any]:
    return {"embeddings": vectors[0] if single else vectors, "model": model_id,
            "dimension": int(vectors.shape[1]),
            "usage": {"inputTokens": tokens, "totalTokens": tokens}}


# -- images ------------------------------------------------------------------------------------


def b64_bytes(value: str | None, param: str) -> bytes:
    if not value:
        raise InvalidRequestError(f"Missing required parameter: '{param}'.", param=param,
                                  code="missing_required_parameter")
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequestError(f"{param} is not valid base64: {exc}", param=param) from exc


def black_mask_to_alpha(data: bytes) -> bytes:
    """Nova masks are black where to repaint and white where to keep; ember's (OpenAI's)
    are transparent where to repaint. Blocking: run it off the event loop."""
    gray = decode_image(data, "inPaintingParams.maskImage").convert("L")
    mask = Image.new("RGBA", gray.size, (0, 0, 0, 255))
    mask.putalpha(gray.point(lambda value: 0 if value < 128 else 255))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


def _size(config: ImageGenerationConfig) -> tuple[int | None, int | None]:
    if (config.width is None) != (config.height is None):
        missing = "height" if config.height is None else "width"
        raise InvalidRequestError("give both width and height, or neither",
                                  param=f"imageGenerationConfig.{missing}")
    return config.width, config.height


def image_request(body: ImageGenerationIn, prompt: str, mode: ImageMode = "generate",
                  negative: str | None = None, image: bytes | None = None,
                  mask: bytes | None = None, strength: float | None = None) -> ImageRequest:
    config = body.image_generation_config
    width, height = _size(config)
    guidance = None if config.cfg_scale == GATEWAY_DEFAULT_CFG else config.cfg_scale
    return ImageRequest(
        model=body.model_id, prompt=prompt, mode=mode,
        n=config.number_of_images, width=width, height=height, guidance_scale=guidance,
        negative_prompt=negative, seed=config.seed,
        quality="hd" if config.quality == "premium" else "auto",
        strength=strength, image=image, mask=mask,
    )


def text_to_image(body: ImageGenerationIn) -> ImageRequest:
    params = body.text_to_image_params
    if params is None or params.text is None:
        raise InvalidRequestError("Missing required parameter: 'textToImageParams.text'.",
                                  param="textToImageParams.text",
                                  code="missing_required_parameter")
    if params.condition_image is not None:
        raise UnsupportedFeatureError(
            "conditioned generation (conditionImage, CANNY_EDGE / SEGMENTATION) is not "
            "supported by this server", param="textToImageParams.conditionImage",
        )
    prompt = params.text
    if params.style is not None:
        prompt = f"{prompt}, {STYLE_WORDS[params.style]}"
    return image_request(body, prompt, negative=params.negative_text)


def image_variation(body: ImageGenerationIn) -> ImageRequest:
    """Image to image; with `text`, guided by it. similarityStrength 0.2..1 (1 = closest)
    maps onto ember's strength 1.0..0.2 (how much is repainted)."""
    params = body.image_variation_params
    if params is None:
        raise InvalidRequestError("Missing required parameter: 'imageVariationParams'.",
                                  param="imageVariationParams",
                                  code="missing_required_parameter")
    if len(params.images) > 1:
        raise UnsupportedFeatureError(
            "ember varies one image at a time; send one image", param="imageVariationParams.images"
        )
    image = b64_bytes(params.images[0], "imageVariationParams.images[0]")
    similarity = params.similarity_strength
    strength = None if similarity is None else round(1.2 - similarity, 3)
    mode: ImageMode = "edit" if params.text else "variation"
    return image_request(body, params.text or "", mode, params.negative_text, image,
                         strength=strength)


def inpainting(body: ImageGenerationIn, mask: bytes) -> ImageRequest:
    params = body.in_painting_params
    assert params is not None  # checked by the route before the mask was converted
    image = b64_bytes(params.image, "inPaintingParams.image")
    return image_request(body, params.text or "", "edit", params.negative_text, image, mask)


# taskType -> the object holding its prompt and image, and the field of the image
TASK_SOURCES = {
    "TEXT_IMAGE": ("textToImageParams", "conditionImage"),
    "IMAGE_VARIATION": ("imageVariationParams", "images[0]"),
    "INPAINTING": ("inPaintingParams", "image"),
}


def image_params(task: str) -> dict[str, str]:
    """Engine error fields (OpenAI's names) as this task's fields are named."""
    source, image = TASK_SOURCES.get(task, ("textToImageParams", "image"))
    config = "imageGenerationConfig"
    return {"prompt": f"{source}.text", "n": f"{config}.numberOfImages",
            "size": f"{config}.width", "guidance_scale": f"{config}.cfgScale",
            "seed": f"{config}.seed", "image": f"{source}.{image}",
            "mask": f"{source}.maskImage", "strength": f"{source}.similarityStrength",
            "negative_prompt": f"{source}.negativeText", "model": "modelId"}
