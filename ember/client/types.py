"""Response objects of `client.ai.inference.*`, with the field names of the gateway SDK they
replace (seed 000), built from ember's OpenAI-shaped JSON. Fields the server sends beyond
those are kept where they are useful (marked "ember extension")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Self


def _int(value: Any, default: int = 0) -> int:
    return int(value) if isinstance(value, int | float) else default


def _float_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


@dataclass
class ChatMessage:
    role: str
    content: str = ""
    name: str | None = None
    function_call: dict[str, Any] | None = None
    tool_calls: list[Any] | None = None  # OpenAI's objects: {id, type, function: {name, arguments}}
    tool_call_id: str | None = None  # a "tool" message: the call it answers

    def to_dict(self) -> dict[str, Any]:
        """The message as a request sends it (fields left at None are not sent)."""
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        for name in ("name", "function_call", "tool_calls", "tool_call_id"):
            if (value := getattr(self, name)) is not None:
                message[name] = value
        return message

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ChatMessage:
        return cls(role=data.get("role") or "assistant", content=data.get("content") or "",
                   name=data.get("name"), function_call=data.get("function_call"),
                   tool_calls=data.get("tool_calls"), tool_call_id=data.get("tool_call_id"))


@dataclass
class TokenUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def from_json(cls, data: Any) -> TokenUsage:
        if not isinstance(data, dict):
            return cls()
        prompt, completion = _int(data.get("prompt_tokens")), _int(data.get("completion_tokens"))
        return cls(prompt, completion, _int(data.get("total_tokens"), prompt + completion))


@dataclass
class ChatCompletionChoice:
    index: int
    message: ChatMessage
    finish_reason: str | None = None


@dataclass
class ChatCompletion:
    id: str
    model: str
    choices: list[ChatCompletionChoice]
    usage: TokenUsage
    created: int

    @property
    def content(self) -> str:
        """The first choice's message content."""
        return self.choices[0].message.content if self.choices else ""

    @staticmethod
    def _message(choice: dict[str, Any]) -> ChatMessage:
        return ChatMessage.from_json(choice.get("message") or {})

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Self:
        choices = [
            ChatCompletionChoice(index=_int(c.get("index")), message=cls._message(c),
                                 finish_reason=c.get("finish_reason"))
            for c in data.get("choices") or []
        ]
        return cls(id=data.get("id", ""), model=data.get("model", ""), choices=choices,
                   usage=TokenUsage.from_json(data.get("usage")),
                   created=_int(data.get("created")))


@dataclass
class Completion(ChatCompletion):
    """A text completion. As in the SDK it replaces, each choice carries its text as
    `message.content` (role "assistant"), so `Completion.content` reads like a chat reply."""

    @staticmethod
    def _message(choice: dict[str, Any]) -> ChatMessage:
        return ChatMessage(role="assistant", content=choice.get("text") or "")


@dataclass
class StreamChunk:
    """One streamed fragment. `content` is "" on the opening (role) chunk and on the chunk
    that carries `finish_reason`. ember extension: `usage`, set on the one final chunk sent
    when the request asks for `stream_options={"include_usage": True}`."""

    id: str
    model: str
    content: str = ""
    finish_reason: str | None = None
    role: str | None = None
    index: int = 0
    usage: TokenUsage | None = None
    # OpenAI's tool-call deltas: the first piece of a call has its index, id and
    # function.name; later ones add to function.arguments.
    tool_calls: list[dict[str, Any]] | None = None

    @classmethod
    def from_chat_frame(cls, frame: dict[str, Any]) -> StreamChunk:
        choices = frame.get("choices") or [{}]
        delta = choices[0].get("delta") or {}
        chunk = cls._build(frame, choices[0], delta.get("content"), delta.get("role"))
        if isinstance(delta.get("tool_calls"), list):
            chunk.tool_calls = delta["tool_calls"]
        return chunk

    @classmethod
    def from_completion_frame(cls, frame: dict[str, Any]) -> StreamChunk:
        choices = frame.get("choices") or [{}]
        return cls._build(frame, choices[0], choices[0].get("text"), None)

    @classmethod
    def _build(cls, frame: dict[str, Any], choice: dict[str, Any], content: Any,
               role: Any) -> StreamChunk:
        usage = frame.get("usage")
        return cls(id=frame.get("id", ""), model=frame.get("model", ""),
                   content=content if isinstance(content, str) else "",
                   finish_reason=choice.get("finish_reason"), role=role,
                   index=_int(choice.get("index")),
                   usage=TokenUsage.from_json(usage) if isinstance(usage, dict) else None)


@dataclass
class EmbeddingData:
    embedding: list[float]
    index: int


@dataclass
class EmbeddingResponse:
    model: str
    data: list[EmbeddingData]
    usage: TokenUsage

    @property
    def embeddings(self) -> list[list[float]]:
        """The vectors, in input order."""
        return [item.embedding for item in sorted(self.data, key=lambda item: item.index)]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EmbeddingResponse:
        items = [EmbeddingData(embedding=list(d.get("embedding") or []), index=_int(d.get("index")))
                 for d in data.get("data") or []]
        return cls(model=data.get("model", ""), data=items,
                   usage=TokenUsage.from_json(data.get("usage")))


@dataclass
class SpeechResponse:
    content: bytes
    content_type: str


@dataclass
class TranscriptionSegment:
    id: int
    start: float
    end: float
    text: str


@dataclass
class TranscriptionResponse:
    """`language` is the language as the server's verbose_json names it ("english"), as
    OpenAI's does; it and `duration` and `segments` are None for the text, srt and vtt
    formats (then `text` is the server's text as is)."""

    text: str
    language: str | None = None
    duration: float | None = None
    segments: list[TranscriptionSegment] | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TranscriptionResponse:
        segments = None
        if isinstance(data.get("segments"), list):
            segments = [
                TranscriptionSegment(id=_int(s.get("id"), i), start=float(s.get("start", 0.0)),
                                     end=float(s.get("end", 0.0)), text=s.get("text", ""))
                for i, s in enumerate(data["segments"])
            ]
        return cls(text=data.get("text", ""), language=data.get("language"),
                   duration=_float_or_none(data.get("duration")), segments=segments)


@dataclass
class ImageData:
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None
    seed: int | None = None  # ember extension: the seed this image was generated with


@dataclass
class ImageGenerationResponse:
    created: int
    data: list[ImageData]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageGenerationResponse:
        images = [ImageData(url=d.get("url"), b64_json=d.get("b64_json"),
                            revised_prompt=d.get("revised_prompt"), seed=d.get("seed"))
                  for d in data.get("data") or []]
        return cls(created=_int(data.get("created")), data=images)


# ember's job states → the names the SDK uses. ember says "queued" and "running"; the SDK
# says "pending" and "processing" for the same two states (the other three are shared).
JOB_STATUS_NAMES = {"queued": "pending", "running": "processing"}


@dataclass
class GenerationJob:
    """A video or music generation job. `status` uses the SDK's names: pending, processing,
    completed, failed, cancelled (`ember_status` keeps the server's own: queued, running, ...).
    `result`, once completed, is a dict with the file's `url` (GET it for the bytes),
    `media_type`, `format`, `bytes` and the media's details (frames, fps, duration_s, ...).
    ember extensions: `kind`, `error`, `ember_status`."""

    job_id: str
    status: str
    created: int
    progress: int
    result: Any
    model: str
    provider: str
    kind: str | None = None
    error: str | None = None
    ember_status: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenerationJob:
        status = str(data.get("status", ""))
        error = data.get("error")
        return cls(
            job_id=data.get("job_id") or data.get("id", ""),
            status=JOB_STATUS_NAMES.get(status, status),
            created=_int(data.get("created", data.get("created_at"))),
            progress=_int(data.get("progress")), result=data.get("result"),
            model=data.get("model", ""), provider=data.get("provider", "ember"),
            kind=data.get("kind"),
            error=error.get("message") if isinstance(error, dict) else error,
            ember_status=status,
        )


@dataclass
class ModerationResult:
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[str]] | None = None  # as OpenAI sends it


@dataclass
class ModerationResponse:
    id: str
    model: str
    results: list[ModerationResult]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModerationResponse:
        results = [
            ModerationResult(flagged=bool(r.get("flagged")),
                             categories=dict(r.get("categories") or {}),
                             category_scores=dict(r.get("category_scores") or {}),
                             category_applied_input_types=r.get("category_applied_input_types"))
            for r in data.get("results") or []
        ]
        return cls(id=data.get("id", ""), model=data.get("model", ""), results=results)


@dataclass
class RerankResult:
    index: int
    relevance_score: float
    document: dict[str, Any] | None = None


@dataclass
class RerankResponse:
    """`meta` carries the server's `usage` (`{"usage": {"total_tokens": N}}`)."""

    id: str
    model: str
    results: list[RerankResult]
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RerankResponse:
        results = [
            RerankResult(index=_int(r.get("index")),
                         relevance_score=float(r.get("relevance_score", 0.0)),
                         document=r.get("document"))
            for r in data.get("results") or []
        ]
        meta = dict(data.get("meta") or {})
        if "usage" in data:
            meta.setdefault("usage", data["usage"])
        return cls(id=data.get("id", ""), model=data.get("model", ""), results=results,
                   meta=meta)
