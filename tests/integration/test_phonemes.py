"""Phonemes for the Piper voice: the espeakng-loader wheel (helper process) and the espeak-ng
program give the same clauses, and a machine without the program still speaks."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from rapidfuzz.distance import Levenshtein

from engine.core.errors import ModelLoadError
from engine.core.settings import Settings
from models import phonemes
from models.phonemes import LibraryPhonemizer, ProgramPhonemizer, choose_phonemizer
from tests.audio_files import seconds
from tests.conftest import serve_in_process

SENTENCES = [
    "The quick brown fox jumps over the lazy dog, and then, he sleeps.",
    "Hello world! Café au lait; twelve apples: yes?",
    "Every morning the baker opens his small shop near the river.",
]


def test_library_and_program_give_the_same_clauses() -> None:
    library, program = LibraryPhonemizer(), ProgramPhonemizer()
    try:
        for sentence in SENTENCES:
            ours, theirs = library.clauses(sentence, "en-us"), program.clauses(sentence, "en-us")
            assert len(ours) == len(theirs), (ours, theirs)
            # The wheel's espeak-ng release may differ from the system's by a vowel or two.
            for a, b in zip(ours, theirs, strict=True):
                assert Levenshtein.normalized_similarity(a, b) >= 0.9, (a, b)
    finally:
        library.close()


def test_the_helper_is_started_again_after_it_dies() -> None:
    library = LibraryPhonemizer()
    try:
        first = library.clauses(SENTENCES[0], "en-us")
        assert library._process is not None
        library._process.kill()
        library._process.wait()
        assert library.clauses(SENTENCES[0], "en-us") == first
    finally:
        library.close()


def test_an_unknown_espeak_voice_is_a_clear_error_and_the_helper_keeps_serving() -> None:
    library = LibraryPhonemizer()
    try:
        with pytest.raises(Exception, match="no voice 'xx-nope'"):
            library.clauses("Hello.", "xx-nope")
        assert library.clauses("Hello.", "en-us")
    finally:
        library.close()


def test_without_either_the_voice_names_both_ways_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(phonemes, "library_installed", lambda: False)
    with pytest.raises(ModelLoadError) as raised:
        choose_phonemizer("auto")
    assert "pip install espeakng-loader" in str(raised.value)
    assert "apt-get install espeak-ng" in str(raised.value)


async def test_the_default_voice_speaks_on_a_machine_without_the_espeak_ng_program(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The issue a new user hit: `make serve` without the system package answered 503."""
    # Keep the programs ember's other code needs, leave espeak-ng out.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        for program in Path(folder).glob("*") if Path(folder).is_dir() else []:
            target = bin_dir / program.name
            if program.name != "espeak-ng" and not target.exists():
                target.symlink_to(program)
    monkeypatch.setenv("PATH", str(bin_dir))
    async with serve_in_process(make_settings()) as served:
        response = await served.openai.audio.speech.create(
            model="tts-1", voice="alloy", input=SENTENCES[2], response_format="wav"
        )
        assert seconds(response.content, "wav") > 2.0
        listing = (await served.http.get("/v1/models")).json()["data"]
        voice = next(m for m in listing if m["id"] == "piper-en-us-joe")
        assert "espeakng-loader" in voice["backend_note"]
