"""Text to speech with Piper voices (VITS exported to ONNX), run with onnxruntime.

The `piper-tts` runtime is GPL, so ember does not use it: phonemes come from espeak-ng in a
separate process (models/phonemes.py; Piper's own phonemizer uses espeak-ng's IPA too), mapped to
ids with the voice's `phoneme_id_map`, and the ONNX graph runs here. Text is synthesized a
sentence at a time, so the first audio streams out while later sentences are still queued.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from engine.contracts.base import AdapterOptions
from engine.contracts.speech import PiperOptions, SpeechRequest
from engine.core.errors import InvalidRequestError, ModelLoadError
from engine.core.sources import resolve_source
from models.base import ModelAdapter
from models.phonemes import Phonemizer, choose_phonemizer

# Silence after each sentence, as Piper's default `sentence_silence`.
SENTENCE_SILENCE_S = 0.2
# Sentences longer than this are split at clause marks or spaces, to keep latency low.
MAX_SENTENCE_CHARS = 400
_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+|\n+")
_CLAUSE_MARKS = re.compile(r"[,;:.!?…]+")
_LANGUAGE_SWITCH = re.compile(r"\([a-z-]+\)")  # espeak marks foreign words "(fr)…(en)"

BOS, EOS, PAD = "^", "$", "_"


@dataclass(frozen=True)
class Utterance:
    """One sentence as phoneme ids, with the synthesis settings of its request."""

    ids: list[int]
    length_scale: float
    speaker: int | None


def split_sentences(text: str) -> list[str]:
    sentences = []
    for sentence in _SENTENCE_END.split(text.strip()):
        sentence = sentence.strip()
        while len(sentence) > MAX_SENTENCE_CHARS:
            head = sentence[:MAX_SENTENCE_CHARS]
            cut = max(head.rfind(", "), head.rfind("; "), head.rfind(" "))
            cut = cut if cut > 0 else MAX_SENTENCE_CHARS
            sentences.append(sentence[:cut + 1].strip())
            sentence = sentence[cut + 1:].strip()
        if sentence:
            sentences.append(sentence)
    return sentences


def espeak_phonemes(sentence: str, voice: str, phonemizer: Phonemizer) -> str:
    """IPA phonemes of one sentence, clause punctuation kept (espeak drops it and gives each
    clause on its own; the marks are put back when the clause count matches)."""
    raw = phonemizer.clauses(sentence, voice)
    clauses = [
        _LANGUAGE_SWITCH.sub("", line).strip()
        for line in raw
    ]
    clauses = [c for c in clauses if c]
    if not clauses:  # nothing to pronounce ("...", "?", a dash): no marks to put back either
        return ""
    marks = [m.group()[0] for m in _CLAUSE_MARKS.finditer(sentence)]
    if marks and not _CLAUSE_MARKS.search(sentence[-1]):
        marks.append("")
    if len(marks) != len(clauses):
        marks = [""] * (len(clauses) - 1) + [marks[-1] if marks else ""]
    return " ".join(clause + mark for clause, mark in zip(clauses, marks, strict=True))


def phoneme_ids(phonemes: str, id_map: dict[str, list[int]]) -> list[int]:
    """Piper's encoding: BOS, then each phoneme followed by PAD, then EOS; phonemes the voice
    does not know are skipped."""
    ids = [*id_map[BOS], *id_map[PAD]]
    for char in unicodedata.normalize("NFD", phonemes):
        if char in id_map:
            ids += [*id_map[char], *id_map[PAD]]
    return [*ids, *id_map[EOS]]


def speakable(phonemes: str, id_map: dict[str, list[int]]) -> bool:
    """Whether the phonemes hold a sound the voice knows (punctuation and spaces alone are
    pauses, not speech): a sentence without one is skipped, not spoken."""
    return any(
        char.isalpha() and char in id_map for char in unicodedata.normalize("NFD", phonemes)
    )


class PiperVoice(ModelAdapter):
    """A `Synthesizer`. Options: `PiperOptions` (engine/contracts/speech.py): `voices` (name →
    {speaker, language}), `voice_aliases` (other names → a voice, e.g. OpenAI's), `onnx_file`
    when the folder holds several."""

    options_model: ClassVar[type[AdapterOptions]] = PiperOptions
    options: PiperOptions
    sample_rate: int

    def load(self) -> None:
        try:
            self.phonemizer = choose_phonemizer(self.options.phonemizer)
        except ModelLoadError as error:
            raise ModelLoadError(f"{self.entry.id!r}: {error}") from None
        self.backend_note = f"phonemes: {self.phonemizer.name}"
        folder = Path(resolve_source(self.entry))
        onnx_file = self.options.onnx_file
        candidates = [folder / onnx_file] if onnx_file else sorted(folder.glob("*.onnx"))
        if not candidates or not candidates[0].is_file():
            raise ModelLoadError(f"{self.entry.id!r}: no .onnx voice in {folder}")
        onnx_path = candidates[0]
        config = json.loads(Path(f"{onnx_path}.json").read_text())
        self.sample_rate = int(config["audio"]["sample_rate"])
        self.espeak_voice = str(config.get("espeak", {}).get("voice", "en-us"))
        self.id_map: dict[str, list[int]] = config["phoneme_id_map"]
        inference = config.get("inference", {})
        self.noise_scale = float(inference.get("noise_scale", 0.667))
        self.length_scale = float(inference.get("length_scale", 1.0))
        self.noise_w = float(inference.get("noise_w", 0.8))
        self.multi_speaker = int(config.get("num_speakers", 1)) > 1
        self._weights_bytes = onnx_path.stat().st_size
        self.model = self._session(onnx_path)

    def _session(self, path: Path) -> Any:
        import onnxruntime
        import torch

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        providers = ["CPUExecutionProvider"]
        if self.context.device.startswith("cuda") and (
            "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        ):
            providers.insert(0, "CUDAExecutionProvider")
        return onnxruntime.InferenceSession(str(path), options, providers=providers)

    def memory_bytes(self) -> int:
        return self._weights_bytes

    def unload(self) -> None:
        self.phonemizer.close()
        super().unload()

    def warmup(self) -> None:
        self.batch(self.prepare(SpeechRequest(self.entry.id, "Ready.", self.voice_names()[0])))


    # -- voices ------------------------------------------------------------------------------

    def voice_names(self) -> list[str]:
        return list(self.options.voices) or ["default"]

    def _speaker(self, voice: str) -> int | None:
        voices, aliases = self.options.voices, self.options.voice_aliases
        name = aliases.get(voice, voice)
        if voices and name not in voices:
            known = sorted([*voices, *aliases])
            raise InvalidRequestError(
                f"voice {voice!r} is not a voice of {self.entry.id!r}; choose one of: "
                f"{', '.join(known)}", param="voice",
            )
        if not self.multi_speaker:
            return None
        return voices[name].speaker if name in voices else 0

    # -- the request thread ------------------------------------------------------------------

    def sentences(self, request: SpeechRequest) -> list[str]:
        """Checks the voice and splits the text; phonemes come later, sentence by sentence."""
        self._speaker(request.voice)
        return split_sentences(request.text)

    def prepare(self, request: SpeechRequest, sentences: list[str] | None = None) -> list[
            Utterance]:
        """Sentences → phoneme ids (one round trip to the phonemizer per sentence).
        Sentences with nothing to pronounce ("...", a lone "?") are dropped, so the result may
        be empty; the caller decides whether that is an error."""
        speaker = self._speaker(request.voice)
        length_scale = self.length_scale / request.speed
        utterances = []
        for sentence in self.sentences(request) if sentences is None else sentences:
            phonemes = espeak_phonemes(sentence, self.espeak_voice, self.phonemizer)
            if speakable(phonemes, self.id_map):
                utterances.append(Utterance(phoneme_ids(phonemes, self.id_map), length_scale,
                                            speaker))
        return utterances

    @staticmethod
    def size_of(utterance: Utterance) -> int:
        return len(utterance.ids)

    # -- the compute thread ------------------------------------------------------------------

    def batch(self, utterances: list[Utterance]) -> list[np.ndarray]:
        """One run per sentence: VITS output lengths differ per row and the graph does not
        report them, so padded rows could not be trimmed exactly."""
        silence = np.zeros(int(self.sample_rate * SENTENCE_SILENCE_S), dtype=np.float32)
        audio = []
        for utterance in utterances:
            inputs: dict[str, np.ndarray] = {
                "input": np.array([utterance.ids], dtype=np.int64),
                "input_lengths": np.array([len(utterance.ids)], dtype=np.int64),
                "scales": np.array(
                    [self.noise_scale, utterance.length_scale, self.noise_w], dtype=np.float32
                ),
            }
            if utterance.speaker is not None:
                inputs["sid"] = np.array([utterance.speaker], dtype=np.int64)
            samples = self.model.run(None, inputs)[0].reshape(-1).astype(np.float32)
            audio.append(np.concatenate([samples, silence]))
        return audio

