"""Speech: ember's audio API against the same models called directly, in one run.

    python -m benchmarks.speech [--quick] [--rounds N] [--out DIR] [--threads N]
    ember bench speech [--quick]

Speech to text (`whisper-base`, int8, beam 5, language detected): real-time factor (RTF =
processing seconds ÷ audio seconds, lower is better) of `/v1/audio/transcriptions` one
request after another and with 4 requests in flight, against plain faster-whisper
`WhisperModel.transcribe` in this process, one clip after another. The clips are made once, at
the start, by ember's own text to speech from four English paragraphs of 10-20 s.

Text to speech (`piper-en-us-joe`, alias tts-1): time to first audio byte and RTF of
`/v1/audio/speech` streamed as mp3 and as pcm, against the Piper adapter synthesizing the
whole paragraph in this process and encoding it once (its first byte is its last).

Baseline and HTTP runs alternate round by round, so slow phases of a noisy machine hit both
alike; the report gives medians and ember ÷ baseline ratios. Prints a Markdown table to stdout
(progress goes to stderr) and writes it to OUT/speech.md, with the raw numbers in
OUT/speech.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import jiwer
import numpy as np
import torch
from faster_whisper import WhisperModel

from benchmarks import harness
from engine.contracts.base import LoadContext
from engine.contracts.speech import SpeechRequest
from engine.core.audio_codec import OUTPUT_RATE, decode_audio, encode_audio
from engine.core.registry import Registry
from engine.core.settings import Settings, load_settings
from engine.core.sources import assemble
from models.piper import PiperVoice

STT_MODEL = "whisper-base"
TTS_MODEL = "piper-en-us-joe"
TTS_ALIAS = "tts-1"  # what OpenAI clients send
VOICE = "alloy"  # an OpenAI voice name, mapped onto the one local voice
BEAM_SIZE = 5  # whisper-base's registry options
CONCURRENCY = 4
DECODE_RATE = 16_000

# Test clips, each about 10-20 s when spoken.
CLIP_TEXTS = [
    "The morning train to the coast was late again, so the passengers waited on the cold "
    "platform with their coffee. A conductor walked along the line and apologised to "
    "everyone. He said that a tree had fallen across the tracks near the river.",
    "Our garden changed a lot this year. We planted tomatoes, beans and three kinds of "
    "lettuce along the fence. The rain came at the right time, and by August we had more "
    "vegetables than we could possibly eat.",
    "The museum opens a new exhibition on Friday about the history of flight. Visitors can "
    "sit inside an old wooden glider, read the letters of early pilots, and watch a short "
    "film about the first crossing of the ocean.",
    "Please remember that the library will close early on Thursday for maintenance. Books "
    "that are due that day can be returned on Friday without a fine. If you have questions, "
    "ask at the front desk or send us an email.",
]
SPEECH_TEXT = (
    "Welcome to the evening news. Heavy rain is expected across the northern valleys tonight, "
    "with strong winds near the coast. The city council approved the new budget for public "
    "transport after a long debate. Schools will reopen on Monday once the repairs to the "
    "heating systems are finished. In sports, the local team won its third match in a row. "
    "We will be back tomorrow morning with more updates."
)


# -- results -------------------------------------------------------------------------------


@dataclass
class SttPass:
    """All clips transcribed once."""

    wall_s: float
    audio_s: float
    texts: list[str]

    @property
    def rtf(self) -> float:
        return self.wall_s / self.audio_s


@dataclass
class TtsRun:
    """The paragraph synthesized once. `stages_s` splits the whole (baseline) run: phonemes,
    synthesis, mp3 encode, and the pcm encode that is timed beside it."""

    ttfb_s: float
    total_s: float
    audio_s: float
    stages_s: dict[str, float] = field(default_factory=dict)

    @property
    def rtf(self) -> float:
        return self.total_s / self.audio_s


@dataclass
class SpeechReport(harness.RoundsReport):
    clip_texts: list[str]
    clip_seconds: list[float]
    # baseline, http_sequential, http_concurrent
    stt: dict[str, list[SttPass]] = field(default_factory=dict)
    # whole_mp3 (baseline), stream_mp3, stream_pcm
    tts: dict[str, list[TtsRun]] = field(default_factory=dict)


# -- audio ---------------------------------------------------------------------------------


def audio_seconds(data: bytes, fmt: str) -> float:
    """Length of an encoded clip (pcm is raw 24 kHz s16le, as OpenAI documents)."""
    if fmt == "pcm":
        return len(data) / 2 / OUTPUT_RATE
    return len(decode_audio(data, sample_rate=DECODE_RATE, max_seconds=3600)) / DECODE_RATE


def make_clips(client: httpx.Client) -> list[bytes]:
    clips = []
    for text in CLIP_TEXTS:
        response = client.post("/v1/audio/speech", json={
            "model": TTS_ALIAS, "input": text, "voice": VOICE, "response_format": "wav"})
        response.raise_for_status()
        clips.append(response.content)
    return clips


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Corpus WER on lower-case words without punctuation."""
    def normalize(text: str) -> str:
        kept = "".join(c if c.isalnum() or c in "' " else " " for c in text.lower())
        return " ".join(kept.split())

    return float(jiwer.wer([normalize(t) for t in references],
                           [normalize(t) for t in hypotheses]))


# -- speech to text ------------------------------------------------------------------------


def load_whisper_baseline(settings: Settings, registry: Registry, threads: int) -> Any:
    """Plain faster-whisper on the folder the server loads (int8, as the registry entry)."""
    entry = registry.resolve(STT_MODEL)
    path = assemble(entry, settings.models_dir)
    return WhisperModel(str(path), device="cpu", compute_type=entry.options["compute_type"],
                        cpu_threads=threads, local_files_only=True)


def baseline_stt(model: Any, clips: list[bytes], audio_s: float) -> SttPass:
    # Each clip is passed as the uploaded bytes, so decoding is inside the clock on both sides.
    started = time.perf_counter()
    texts = []
    for clip in clips:
        segments, _info = model.transcribe(io.BytesIO(clip), beam_size=BEAM_SIZE, language=None)
        texts.append("".join(segment.text for segment in segments).strip())
    return SttPass(time.perf_counter() - started, audio_s, texts)


def http_transcribe(client: httpx.Client, clip: bytes) -> str:
    response = client.post(
        "/v1/audio/transcriptions", files={"file": ("clip.wav", clip, "audio/wav")},
        data={"model": STT_MODEL, "response_format": "json"},
    )
    response.raise_for_status()
    return str(response.json()["text"]).strip()


def http_stt_sequential(client: httpx.Client, clips: list[bytes], audio_s: float) -> SttPass:
    started = time.perf_counter()
    texts = [http_transcribe(client, clip) for clip in clips]
    return SttPass(time.perf_counter() - started, audio_s, texts)


def http_stt_concurrent(
    client: httpx.Client, clips: list[bytes], audio_s: float, pool: ThreadPoolExecutor
) -> SttPass:
    started = time.perf_counter()
    texts = list(pool.map(lambda clip: http_transcribe(client, clip), clips))
    return SttPass(time.perf_counter() - started, audio_s, texts)


def show_stt(result: SttPass) -> str:
    return f"RTF {result.rtf:.3f} ({result.wall_s:.1f} s for {result.audio_s:.1f} s of audio)"


# -- text to speech ------------------------------------------------------------------------


def load_piper_baseline(settings: Settings, registry: Registry) -> PiperVoice:
    """The server's own adapter (onnxruntime threads follow torch's, set by the caller)."""
    context = LoadContext(device="cpu", dtype=torch.float32, models_dir=settings.models_dir)
    voice = PiperVoice(registry.resolve(TTS_MODEL), context)
    voice.load()
    return voice


def whole_speech(voice: PiperVoice) -> TtsRun:
    """The paragraph phonemized, synthesized sentence by sentence (as the server runs it) and
    encoded in one piece: nothing could be sent before the end."""
    started = time.perf_counter()
    utterances = voice.prepare(SpeechRequest(TTS_MODEL, SPEECH_TEXT, VOICE))
    phonemized = time.perf_counter()
    samples = np.concatenate(voice.batch(utterances))
    synthesized = time.perf_counter()
    encode_audio(samples, voice.sample_rate, "mp3")
    encoded = time.perf_counter()
    encode_audio(samples, voice.sample_rate, "pcm")
    pcm_encoded = time.perf_counter()
    total = encoded - started
    return TtsRun(total, total, len(samples) / voice.sample_rate, {
        "phonemes": phonemized - started, "synthesis": synthesized - phonemized,
        "encode_mp3": encoded - synthesized, "encode_pcm": pcm_encoded - encoded,
    })


def streamed_speech(client: httpx.Client, fmt: str) -> TtsRun:
    body = {"model": TTS_ALIAS, "input": SPEECH_TEXT, "voice": VOICE, "response_format": fmt}
    data = bytearray()
    first_byte = None
    started = time.perf_counter()
    with client.stream("POST", "/v1/audio/speech", json=body) as response:
        response.raise_for_status()
        for chunk in response.iter_bytes():
            if chunk and first_byte is None:
                first_byte = time.perf_counter()
            data += chunk
    finished = time.perf_counter()
    if first_byte is None:
        raise RuntimeError(f"the {fmt} speech response was empty")
    return TtsRun(first_byte - started, finished - started, audio_seconds(bytes(data), fmt))


def show_tts(result: TtsRun) -> str:
    return (f"first byte {result.ttfb_s * 1000:.0f} ms, total {result.total_s:.2f} s, "
            f"RTF {result.rtf:.3f} ({result.audio_s:.1f} s of audio)")


# -- report --------------------------------------------------------------------------------


def whole_pcm_s(run: TtsRun) -> float:
    """The whole baseline run as if it had encoded pcm instead of mp3."""
    return run.total_s - run.stages_s["encode_mp3"] + run.stages_s["encode_pcm"]


def summary(report: SpeechReport) -> dict[str, float]:
    """Medians over rounds, and ember ÷ baseline ratios (lower is better for all of them)."""
    def stt_rtf(name: str) -> float:
        return statistics.median(p.rtf for p in report.stt[name])

    def tts(name: str, value: Any) -> float:
        return statistics.median(value(run) for run in report.tts[name])

    numbers = {
        "stt_rtf_baseline": stt_rtf("baseline"),
        "stt_rtf_http_sequential": stt_rtf("http_sequential"),
        "stt_rtf_http_concurrent": stt_rtf("http_concurrent"),
        "tts_ttfb_s_whole_mp3": tts("whole_mp3", lambda r: r.ttfb_s),
        "tts_ttfb_s_whole_pcm": tts("whole_mp3", whole_pcm_s),
        "tts_rtf_whole_mp3": tts("whole_mp3", lambda r: r.rtf),
        "tts_rtf_whole_pcm": tts("whole_mp3", lambda r: whole_pcm_s(r) / r.audio_s),
    }
    for fmt in ("mp3", "pcm"):
        numbers[f"tts_ttfb_s_stream_{fmt}"] = tts(f"stream_{fmt}", lambda r: r.ttfb_s)
        numbers[f"tts_rtf_stream_{fmt}"] = tts(f"stream_{fmt}", lambda r: r.rtf)
        numbers[f"tts_ttfb_ratio_{fmt}"] = (numbers[f"tts_ttfb_s_stream_{fmt}"]
                                            / numbers[f"tts_ttfb_s_whole_{fmt}"])
        numbers[f"tts_rtf_ratio_{fmt}"] = (numbers[f"tts_rtf_stream_{fmt}"]
                                           / numbers[f"tts_rtf_whole_{fmt}"])
    for name in ("http_sequential", "http_concurrent"):
        numbers[f"stt_rtf_ratio_{name}"] = numbers[f"stt_rtf_{name}"] / numbers["stt_rtf_baseline"]
    return numbers


def render(report: SpeechReport) -> str:
    m, s = report.machine, summary(report)
    clips = f"{len(report.clip_seconds)} clips, {sum(report.clip_seconds):.0f} s"
    whole = report.tts["whole_mp3"]
    rows: list[tuple[str, float, float, float, str]] = [
        (f"STT RTF, one request at a time ({clips})", s["stt_rtf_baseline"],
         s["stt_rtf_http_sequential"], s["stt_rtf_ratio_http_sequential"], ".3f"),
        (f"STT RTF, {CONCURRENCY} requests in flight", s["stt_rtf_baseline"],
         s["stt_rtf_http_concurrent"], s["stt_rtf_ratio_http_concurrent"], ".3f"),
    ]
    for fmt in ("mp3", "pcm"):
        rows += [
            (f"TTS time to first byte ms, {fmt}", 1000 * s[f"tts_ttfb_s_whole_{fmt}"],
             1000 * s[f"tts_ttfb_s_stream_{fmt}"], s[f"tts_ttfb_ratio_{fmt}"], ".0f"),
            (f"TTS RTF, {fmt}", s[f"tts_rtf_whole_{fmt}"], s[f"tts_rtf_stream_{fmt}"],
             s[f"tts_rtf_ratio_{fmt}"], ".3f"),
        ]
    stages = {name: 1000 * statistics.median(run.stages_s[name] for run in whole)
              for name in whole[0].stages_s}
    last_texts = {name: passes[-1].texts for name, passes in report.stt.items()}
    wer = {name: word_error_rate(report.clip_texts, texts) for name, texts in last_texts.items()}
    lines = [
        "# ember speech",
        "",
        f"{m.stamp} · {report.runtimes_line} · "
        f"{m.threads} threads · median of {report.rounds} interleaved rounds",
        "",
        "| metric | baseline | ember HTTP | ratio |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {b:{fmt}} | {h:{fmt}} | {ratio:.2f} |"
          for name, b, h, ratio, fmt in rows),
        "",
        f"STT: `{STT_MODEL}` (int8, beam {BEAM_SIZE}, language detected); baseline "
        "faster-whisper `WhisperModel.transcribe` in-process, one clip after another (the "
        f"reference for both rows). TTS: `{TTS_MODEL}` streamed by `/v1/audio/speech`; "
        "baseline the same adapter in-process synthesizing the whole paragraph, then encoding "
        "it once, so its first byte is its last. RTF = processing s ÷ audio s. Ratio = "
        "ember HTTP ÷ baseline; lower is better in every row.",
        "",
        f"Whole synthesis (median): phonemes (espeak-ng) {stages['phonemes']:.0f} ms, "
        f"synthesis {stages['synthesis']:.0f} ms, mp3 encode {stages['encode_mp3']:.0f} ms, "
        f"pcm encode {stages['encode_pcm']:.0f} ms, for "
        f"{statistics.median(run.audio_s for run in whole):.1f} s of audio.",
        "",
        "Word error rate against the source text (last round): baseline "
        f"{wer['baseline']:.3f}, ember one at a time {wer['http_sequential']:.3f}, ember "
        f"{CONCURRENCY} in flight {wer['http_concurrent']:.3f}.",
    ]
    return "\n".join(lines) + "\n"


def raw_numbers(report: SpeechReport) -> dict[str, Any]:
    return harness.raw(report, medians=summary(report))


# -- main ----------------------------------------------------------------------------------


def runtime_versions() -> dict[str, str]:
    names = ("faster-whisper", "ctranslate2", "onnxruntime", "av")
    return {name: metadata.version(name) for name in names}


def measure(args: argparse.Namespace, progress: harness.Progress, scratch: Path
            ) -> SpeechReport:
    settings = load_settings(preload=[])
    registry = Registry.from_settings(settings)
    torch.set_num_threads(args.threads)  # the Piper adapter gives onnxruntime torch's count
    with harness.serve(progress, scratch / "server.log", args.threads,
                       preload=[STT_MODEL, TTS_MODEL]) as server, \
            ThreadPoolExecutor(CONCURRENCY) as pool:
        client = server.client
        # Load the baselines while the server loads: load time is not measured.
        progress.step("loading the baseline models in-process")
        whisper = load_whisper_baseline(settings, registry, args.threads)
        piper = load_piper_baseline(settings, registry)
        server.ready(progress)

        clips = progress.run(
            f"making {len(CLIP_TEXTS)} test clips with ember's text to speech",
            lambda: make_clips(client),
            lambda made: ", ".join(f"{audio_seconds(c, 'wav'):.1f} s" for c in made))
        clip_seconds = [audio_seconds(clip, "wav") for clip in clips]
        audio_s = sum(clip_seconds)
        machine = dataclasses.replace(
            harness.describe_machine(args.threads, torch.float32, "cpu"),
            dtype="int8 (whisper), float32 (piper)")
        report = SpeechReport(machine, runtime_versions(), args.rounds, CLIP_TEXTS,
                              clip_seconds)
        report.stt = harness.interleave(progress, args.rounds, "stt", show_stt, {
            "baseline": lambda: baseline_stt(whisper, clips, audio_s),
            "http_sequential": lambda: http_stt_sequential(client, clips, audio_s),
            "http_concurrent": lambda: http_stt_concurrent(client, clips, audio_s, pool),
        })
        report.tts = harness.interleave(progress, args.rounds, "tts", show_tts, {
            "whole_mp3": lambda: whole_speech(piper),
            "stream_mp3": lambda: streamed_speech(client, "mp3"),
            "stream_pcm": lambda: streamed_speech(client, "pcm"),
        })
        return report


def step_count(args: argparse.Namespace) -> int:
    setup = 4  # start server, load baselines, wait for ready, make clips
    return setup + (args.rounds + 1) * (3 + 3)  # warm-up + rounds; stt: 3 variants, tts: 3


def main(argv: list[str] | None = None) -> int:
    args = harness.Arguments(
        "speech", __doc__, rounds=3,
        threads="threads for the baselines and the server (default: all cores)").parse(argv)
    return harness.run(args, "speech", step_count, measure, render, raw_numbers)


if __name__ == "__main__":
    sys.exit(main())
