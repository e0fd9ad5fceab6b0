"""The speech report's arithmetic and table, on synthetic timings (no models)."""

from __future__ import annotations

import json

import pytest

from benchmarks.harness import Machine
from benchmarks.speech import (
    CLIP_TEXTS,
    SpeechReport,
    SttPass,
    TtsRun,
    raw_numbers,
    render,
    summary,
)

AUDIO_S = 40.0


def stt_pass(wall_s: float, texts: list[str] | None = None) -> SttPass:
    return SttPass(wall_s=wall_s, audio_s=AUDIO_S, texts=texts or list(CLIP_TEXTS))


def whole(total_s: float) -> TtsRun:
    # phonemes + synthesis + mp3 encode = total; the pcm encode is timed beside it.
    stages = {"phonemes": 0.1, "synthesis": total_s - 0.3, "encode_mp3": 0.2, "encode_pcm": 0.01}
    return TtsRun(ttfb_s=total_s, total_s=total_s, audio_s=20.0, stages_s=stages)


def report() -> SpeechReport:
    machine = Machine("cpu", 2, 2, "t", "tf", "3.11", "abc", "int8", "cpu", "today")
    result = SpeechReport(machine, {"faster-whisper": "1.2.1"}, rounds=3,
                          clip_texts=list(CLIP_TEXTS), clip_seconds=[10.0] * 4)
    # Medians: baseline 8 s, one at a time 6 s, concurrent 4 s (the outliers are ignored).
    result.stt = {
        "baseline": [stt_pass(8.0), stt_pass(30.0), stt_pass(7.0)],
        "http_sequential": [stt_pass(6.0), stt_pass(5.0), stt_pass(9.0)],
        "http_concurrent": [stt_pass(4.0), stt_pass(4.0),
                            stt_pass(4.0, ["garbled", *CLIP_TEXTS[1:]])],
    }
    result.tts = {
        "whole_mp3": [whole(1.0), whole(1.2), whole(5.0)],  # median 1.2 s
        "stream_mp3": [TtsRun(0.3, 1.2, 20.0)] * 3,
        "stream_pcm": [TtsRun(0.1, 1.0, 20.0)] * 3,
    }
    return result


def test_medians_and_ratios() -> None:
    numbers = summary(report())
    assert numbers["stt_rtf_baseline"] == pytest.approx(8.0 / AUDIO_S)
    assert numbers["stt_rtf_ratio_http_sequential"] == pytest.approx(6.0 / 8.0)
    assert numbers["stt_rtf_ratio_http_concurrent"] == pytest.approx(4.0 / 8.0)
    assert numbers["tts_ttfb_s_whole_mp3"] == pytest.approx(1.2)
    # pcm instead of mp3: 1.2 - 0.2 + 0.01
    assert numbers["tts_ttfb_s_whole_pcm"] == pytest.approx(1.01)
    assert numbers["tts_ttfb_ratio_mp3"] == pytest.approx(0.3 / 1.2)
    assert numbers["tts_ttfb_ratio_pcm"] == pytest.approx(0.1 / 1.01)
    assert numbers["tts_rtf_ratio_mp3"] == pytest.approx(1.0)
    assert numbers["tts_rtf_whole_pcm"] == pytest.approx(1.01 / 20.0)


def test_table() -> None:
    text = render(report())
    assert "| STT RTF, one request at a time (4 clips, 40 s) | 0.200 | 0.150 | 0.75 |" in text
    assert "| STT RTF, 4 requests in flight | 0.200 | 0.100 | 0.50 |" in text
    assert "| TTS time to first byte ms, mp3 | 1200 | 300 | 0.25 |" in text
    assert "| TTS time to first byte ms, pcm | 1010 | 100 | 0.10 |" in text
    assert "| TTS RTF, mp3 | 0.060 | 0.060 | 1.00 |" in text
    assert "median of 3 interleaved rounds" in text
    assert "mp3 encode 200 ms, pcm encode 10 ms, for 20.0 s of audio" in text
    # The last round's transcripts: exact for the baseline, one clip wrong when concurrent.
    assert "baseline 0.000" in text
    assert "in flight 0.000" not in text


def test_raw_numbers_are_json() -> None:
    data = json.loads(json.dumps(raw_numbers(report())))
    assert data["medians"]["stt_rtf_http_concurrent"] == pytest.approx(0.1)
    assert len(data["stt"]["baseline"]) == 3
