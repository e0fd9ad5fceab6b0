"""Wire schemas of the QuantCDN AI inference API (seed 002), camelCase as the published
`quantcdn-client` (4.8) sends it, with its defaults. Unknown fields are accepted and ignored;
a known field with a bad value is a 400 naming it (by its camelCase name)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.openapi import AT_LEAST_ONE, NonEmpty, Published
from server.wire import Temperature

# A content block: {text} or {image: {format, source: {bytes}}} (video and document blocks are
# refused: ember reads neither).
ContentBlock = Annotated[dict[str, Any], Published(anyOf=[
    {"required": ["text"], "properties": {"text": {"type": "string"}}},
    {"required": ["image"], "properties": {"image": {
        "type": "object", "required": ["format", "source"],
        "properties": {"format": {"type": "string"},
                       "source": {"type": "object", "required": ["bytes"],
                                  "properties": {"bytes": {"type": "string", "pattern": r"\S"}}}},
    }}},
])]


class Wire(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, protected_namespaces=())


class MessageIn(Wire):
    role: Literal["user", "assistant", "system"]
    # A string, or content blocks: {text}, {image: {format, source: {bytes}}}, {video}, {document}
    content: str | list[ContentBlock]


class ResponseFormatIn(Wire):
    """`{type: "json", jsonSchema?}`: JSON output, valid against the schema when one is given."""

    type: Literal["json"] | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="jsonSchema")


class InputSchemaIn(Wire):
    json_: dict[str, Any] | None = Field(None, alias="json")


class ToolSpecIn(Wire):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: str = ""
    input_schema: InputSchemaIn | None = Field(None, alias="inputSchema")


class ToolIn(Wire):
    tool_spec: ToolSpecIn = Field(alias="toolSpec")


class ToolNameIn(Wire):
    name: str = Field(min_length=1)


class ToolChoiceIn(Wire):
    """Bedrock Converse's toolChoice (an extension here: the published client has no field
    for it): exactly one of `auto` (text or calls), `any` (at least one call), `tool` (that
    one)."""

    auto: dict[str, Any] | None = None
    any: dict[str, Any] | None = None
    tool: ToolNameIn | None = None

    def choice(self) -> str:
        if self.tool is not None:
            return self.tool.name
        return "required" if self.any is not None else "auto"


class ToolConfigIn(Wire):
    tools: list[ToolIn] | None = Field(None, max_length=128)
    tool_choice: ToolChoiceIn | None = Field(None, alias="toolChoice")
    # ember returns toolUse for the caller to run; true is a 400.
    auto_execute: bool = Field(False, alias="autoExecute", json_schema_extra={"const": False})
    allowed_tools: list[str] | None = Field(None, alias="allowedTools")


class ChatIn(Wire):
    messages: list[MessageIn] = Field(min_length=1)
    model_id: str = Field(alias="modelId", min_length=1)
    temperature: Temperature = 0.7
    max_tokens: int = Field(1024, ge=1, le=8192, alias="maxTokens")
    top_p: float | None = Field(None, gt=0, le=1, alias="topP")
    stream: bool | None = None  # the buffered route answers in one piece whatever it says
    system_prompt: str | None = Field(None, alias="systemPrompt")
    stop_sequences: list[str] | None = Field(None, max_length=4, alias="stopSequences")
    response_format: ResponseFormatIn | None = Field(None, alias="responseFormat")
    tool_config: ToolConfigIn | None = Field(None, alias="toolConfig")


class EmbeddingsIn(Wire):
    input: NonEmpty | Annotated[list[NonEmpty], AT_LEAST_ONE]
    model_id: str = Field("amazon.titan-embed-text-v2:0", alias="modelId", min_length=1)
    dimensions: int | None = Field(1024, ge=1)
    normalize: bool = Field(True, json_schema_extra={"const": True})  # unit vectors only


NovaStyle = Literal[
    "3D_ANIMATED_FAMILY_FILM", "DESIGN_SKETCH", "FLAT_VECTOR_ILLUSTRATION",
    "GRAPHIC_NOVEL_ILLUSTRATION", "MAXIMALISM", "MIDCENTURY_RETRO", "PHOTOREALISM",
    "SOFT_DIGITAL_PAINTING",
]
TaskType = Literal[
    "TEXT_IMAGE", "COLOR_GUIDED_GENERATION", "IMAGE_VARIATION", "INPAINTING", "OUTPAINTING",
    "BACKGROUND_REMOVAL", "VIRTUAL_TRY_ON",
]


class TextToImageParams(Wire):
    text: str | None = Field(None, min_length=1, max_length=1024)
    negative_text: str | None = Field(None, min_length=1, max_length=1024, alias="negativeText")
    style: NovaStyle | None = None
    condition_image: str | None = Field(None, alias="conditionImage")
    control_mode: Literal["CANNY_EDGE", "SEGMENTATION"] | None = Field(None, alias="controlMode")
    control_strength: float | None = Field(None, ge=0, le=1, alias="controlStrength")


class ImageVariationParams(Wire):
    images: list[str] = Field(min_length=1, max_length=5)
    similarity_strength: float | None = Field(None, ge=0.2, le=1, alias="similarityStrength")
    text: str | None = Field(None, min_length=1, max_length=1024)
    negative_text: str | None = Field(None, min_length=1, max_length=1024, alias="negativeText")


class InPaintingParams(Wire):
    image: str | None = None
    mask_image: str | None = Field(None, alias="maskImage")
    mask_prompt: str | None = Field(None, alias="maskPrompt")
    text: str | None = Field(None, min_length=1, max_length=1024)
    negative_text: str | None = Field(None, alias="negativeText")


class ImageGenerationConfig(Wire):
    width: int | None = Field(None, ge=1)
    height: int | None = Field(None, ge=1)
    quality: Literal["standard", "premium"] = "standard"
    cfg_scale: float = Field(6.5, ge=1.1, le=10, alias="cfgScale")
    seed: int | None = Field(None, ge=0, le=2147483646)
    number_of_images: int = Field(1, ge=1, le=5, alias="numberOfImages")


class ImageGenerationIn(Wire):
    model_id: str = Field("amazon.nova-canvas-v1:0", alias="modelId", min_length=1)
    task_type: TaskType = Field(alias="taskType")
    text_to_image_params: TextToImageParams | None = Field(None, alias="textToImageParams")
    image_variation_params: ImageVariationParams | None = Field(
        None, alias="imageVariationParams"
    )
    in_painting_params: InPaintingParams | None = Field(None, alias="inPaintingParams")
    image_generation_config: ImageGenerationConfig = Field(
        default_factory=ImageGenerationConfig, alias="imageGenerationConfig"
    )
    region: str | None = None  # where Nova Canvas runs; a local server has one place
