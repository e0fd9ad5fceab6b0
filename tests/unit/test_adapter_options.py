"""Each adapter's typed `options:` (its `options_model`, engine/contracts/<task>.py): every
packaged registry entry validates, an unknown key or a wrong type is refused naming the entry
and the key; and each packaged adapter class has every member of its task's contract."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from pydantic import ValidationError

from engine.contracts.base import AdapterOptions, LoadContext
from engine.contracts.chat import ChatBackend, ChatOptions
from engine.contracts.embeddings import Embedder
from engine.contracts.images import ImageGenerator
from engine.contracts.media import MediaGenerator, VideoOptions
from engine.contracts.ranking import Moderator, Reranker
from engine.contracts.speech import Synthesizer, Transcriber
from engine.core.backends import LLAMA_CPP_ADAPTER
from engine.core.errors import ModelLoadError
from engine.core.manager import adapter_class
from engine.core.registry import ModelEntry, Registry
from models.base import AnyOptions, ModelAdapter
from tests.conftest import TINY_VIDEO_OPTIONS

REGISTRY = Path(__file__).resolve().parents[2] / "configs" / "models.yaml"
ENTRIES = Registry.from_file(REGISTRY).entries()
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None

CONTRACTS: dict[str, type] = {
    "chat": ChatBackend, "vision": ChatBackend, "embedding": Embedder, "rerank": Reranker,
    "moderation": Moderator, "stt": Transcriber, "tts": Synthesizer, "image": ImageGenerator,
    "video": MediaGenerator, "music": MediaGenerator,
}


def adapters_of(entry: ModelEntry) -> list[str]:
    """The adapters that may serve the entry: a chat entry with a GGUF file may run on
    llama.cpp instead (engine/core/backends.py)."""
    adapters = [entry.adapter]
    if entry.task == "chat" and (entry.gguf_file or entry.backend == "llama.cpp") \
            and HAS_LLAMA_CPP:
        adapters.append(LLAMA_CPP_ADAPTER)
    return adapters


def served(entry: ModelEntry, adapter: str) -> tuple[ModelEntry, type[ModelAdapter]]:
    entry = entry.model_copy(update={"adapter": adapter})
    cls: type[ModelAdapter] = adapter_class(entry)
    return entry, cls


PAIRS = [(entry, adapter) for entry in ENTRIES for adapter in adapters_of(entry)]
PACKAGED_ADAPTERS = sorted({adapter for _, adapter in PAIRS})


@pytest.mark.parametrize(("entry", "adapter"), PAIRS, ids=[f"{e.id}@{a}" for e, a in PAIRS])
def test_every_packaged_entry_validates_against_its_adapter_options(
    entry: ModelEntry, adapter: str
) -> None:
    entry, cls = served(entry, adapter)
    assert cls.options_model is not AnyOptions, f"{adapter} names no options model"
    assert issubclass(cls.options_model, AdapterOptions)
    assert cls.options_model.model_config.get("extra") == "forbid"
    options = cls.parsed_options(entry)
    assert isinstance(options, cls.options_model)
    # Every key the entry sets is one the model reads (none dropped on the way).
    assert set(entry.options) <= set(options.model_fields_set)


@pytest.mark.parametrize("adapter", [a for a in PACKAGED_ADAPTERS if a != LLAMA_CPP_ADAPTER])
def test_building_an_adapter_checks_its_options(adapter: str, tmp_path: Path) -> None:
    entry = ModelEntry(id="bad-entry", task="chat", adapter=adapter, source="nowhere",
                       options={"no_such_option": 1})
    with pytest.raises(ModelLoadError) as caught:
        adapter_class(entry)(entry, LoadContext("cpu", torch.float32, tmp_path))
    assert "'bad-entry'" in caught.value.message
    assert "options.no_such_option" in caught.value.message
    assert "is not an option of" in caught.value.message


def _entry(adapter: str, **options: Any) -> ModelEntry:
    return ModelEntry(id="bad-entry", task="video", adapter=adapter, source="nowhere",
                      options=options)


@pytest.mark.parametrize(("adapter", "options", "key"), [
    ("models.whisper:WhisperSpeechToText", {"beam_size": "many"}, "options.beam_size"),
    ("models.whisper:WhisperSpeechToText", {"beam_size": 0}, "options.beam_size"),
    ("models.diffusion:DiffusionImages", {"default_size": "big"}, "options.default_size"),
    ("models.diffusion:DiffusionImages", {"max_steps": [3]}, "options.max_steps"),
    ("models.video:TextToVideo", {"frame_rule": "3x"}, "options.frame_rule"),
    ("models.video:TextToVideo", {"max_fps": "fast"}, "options.max_fps"),
    ("models.music:MusicGen", {"max_duration": "long"}, "options.max_duration"),
    ("models.chat:TransformersChat", {"flash_attn": "yes"}, "options.flash_attn"),
    ("models.chat:TransformersChat", {"vision_model": 3}, "options.vision_model"),
    ("models.piper:PiperVoice", {"voices": {"joe": {"speaker": "x"}}},
     "options.voices.joe.speaker"),
    ("models.piper:PiperVoice", {"voices": {"joe": {"accent": "x"}}},
     "options.voices.joe.accent"),
    ("models.moderation:TransformersModeration", {"activation": "tanh"},
     "options.activation"),
    ("models.moderation:ProfanityCheckModeration", {"thresholds": {"hate": "high"}},
     "options.thresholds.hate"),
])
def test_a_wrong_type_is_refused_naming_the_entry_and_key(
    adapter: str, options: dict[str, Any], key: str
) -> None:
    entry = _entry(adapter, **options)
    with pytest.raises(ModelLoadError) as caught:
        adapter_class(entry).parsed_options(entry)
    assert caught.value.message.startswith("registry entry 'bad-entry': ")
    assert key in caught.value.message


def test_options_models_fill_their_defaults() -> None:
    video = VideoOptions.model_validate(TINY_VIDEO_OPTIONS)
    assert (video.default_size, video.duration, video.frame_rule) == ((64, 48), 1.0, "4k+1")
    assert VideoOptions().duration == 4.0 and VideoOptions(max_duration=2.5).duration == 2.5
    piper = adapter_class(_entry("models.piper:PiperVoice")).options_model
    assert piper.model_validate({"voices": {"joe": None}}).voices["joe"].speaker == 0
    assert ChatOptions.model_validate({"flash_attn": "auto"}).flash_attn == "auto"
    with pytest.raises(ValidationError):  # frozen
        setattr(ChatOptions(vision_model="x"), "vision_model", "y")  # noqa: B010


def test_a_job_with_bad_options_is_refused_at_submit() -> None:
    entry = _entry("models.video:TextToVideo", default_fps="eight")
    with pytest.raises(ModelLoadError, match=r"options\.default_fps"):
        adapter_class(entry).validate(entry, {"prompt": "waves"})


def protocol_members(contract: type) -> tuple[set[str], set[str]]:
    """(methods, data attributes) a Protocol declares, its base contracts' included."""
    methods: set[str] = set()
    attributes: set[str] = set()
    for base in contract.__mro__:
        if not getattr(base, "_is_protocol", False) or base.__module__ == "typing":
            continue
        for name, value in vars(base).items():
            if not name.startswith("_") and (callable(value) or isinstance(value, classmethod)):
                methods.add(name)
        attributes.update(n for n in getattr(base, "__annotations__", {})
                          if not n.startswith("_"))
    return methods, attributes - methods


def class_annotations(cls: type) -> set[str]:
    return {name for klass in cls.__mro__ for name in getattr(klass, "__annotations__", {})}


TASK_ADAPTERS = sorted({(entry.task, adapter) for entry, adapter in PAIRS})


@pytest.mark.parametrize(("task", "adapter"), TASK_ADAPTERS,
                         ids=[f"{t}@{a}" for t, a in TASK_ADAPTERS])
def test_each_packaged_adapter_has_every_member_of_its_task_contract(
    task: str, adapter: str
) -> None:
    cls = adapter_class(_entry(adapter))
    methods, attributes = protocol_members(CONTRACTS[task])
    assert methods, f"no methods found on {CONTRACTS[task].__name__}"
    for name in sorted(methods):
        member = inspect.getattr_static(cls, name, None)
        assert member is not None and callable(getattr(cls, name)), \
            f"{adapter} lacks {CONTRACTS[task].__name__}.{name}"
    for name in sorted(attributes):
        assert hasattr(cls, name) or name in class_annotations(cls), \
            f"{adapter} does not declare {CONTRACTS[task].__name__}.{name}"


if TYPE_CHECKING:  # mypy checks each packaged adapter class against its task's contract
    from models.chat import TransformersChat
    from models.diffusion import DiffusionImages
    from models.embeddings import SentenceTransformerEmbeddings
    from models.llamacpp import LlamaCppChat
    from models.moderation import ProfanityCheckModeration, TransformersModeration
    from models.music import MusicGen
    from models.piper import PiperVoice
    from models.rerank import BiEncoderRerank, CrossEncoderRerank
    from models.video import TextToVideo
    from models.vision import VisionChat
    from models.whisper import WhisperSpeechToText

    _chat: list[type[ChatBackend]] = [TransformersChat, LlamaCppChat, VisionChat]
    _embedder: type[Embedder] = SentenceTransformerEmbeddings
    _rerankers: list[type[Reranker]] = [CrossEncoderRerank, BiEncoderRerank]
    _moderators: list[type[Moderator]] = [ProfanityCheckModeration, TransformersModeration]
    _transcriber: type[Transcriber] = WhisperSpeechToText
    _synthesizer: type[Synthesizer] = PiperVoice
    _images: type[ImageGenerator] = DiffusionImages
    _media: list[type[MediaGenerator]] = [TextToVideo, MusicGen]


async def test_a_bad_registry_entry_stops_the_engine_at_start(tmp_path: Path) -> None:
    """Options are checked when the engine starts, not at the entry's first request; an
    entry whose adapter cannot be imported is left to its load."""
    from engine.core.manager import check_registry_options
    from engine.core.settings import Settings
    from engine.service import Engine

    good = ModelEntry(id="fine", task="stt", adapter="models.whisper:WhisperSpeechToText",
                      source="nowhere", options={"beam_size": 2})
    missing = ModelEntry(id="elsewhere", task="stt", adapter="no_such_module:Adapter",
                         source="nowhere", options={"anything": 1})
    check_registry_options(Registry([good, missing]))  # nothing to refuse
    bad = good.model_copy(update={"id": "typo", "options": {"beam_sise": 2}})
    engine = Engine(Settings(models_dir=tmp_path, data_dir=tmp_path, preload=[]),
                    manager=None)
    engine.registry = Registry([good, bad])
    with pytest.raises(ModelLoadError, match=r"'typo'.*beam_sise"):
        await engine.start()
    await engine.stop()
