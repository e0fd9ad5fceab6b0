"""Where Piper voices get their IPA phonemes: espeak-ng, always in a process of its own.

Two ways, same output (a list of clauses per sentence):
- `LibraryPhonemizer`: the libespeak-ng and data that the `espeakng-loader` wheel ships (so
  `pip install` is the whole set-up), loaded by `espeak_helper.py` in one long-lived child
  process; ember's process never loads the GPL library.
- `ProgramPhonemizer`: the system's `espeak-ng` program, one run per sentence.
`choose_phonemizer("auto")` takes the wheel when it is installed, else the program.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Literal, Protocol

from engine.core.errors import InvalidRequestError, ModelLoadError

HELPER = Path(__file__).with_name("espeak_helper.py")
PhonemizerChoice = Literal["auto", "library", "program"]
INSTALL_HINT = (
    "pip install espeakng-loader (a wheel with libespeak-ng), "
    "or the program: apt-get install espeak-ng / brew install espeak-ng"
)


class Phonemizer(Protocol):
    name: str

    def clauses(self, sentence: str, voice: str) -> list[str]:
        """IPA phonemes of one sentence, one string per clause (punctuation dropped)."""
        ...

    def close(self) -> None: ...


class ProgramPhonemizer:
    name = "espeak-ng program"

    def clauses(self, sentence: str, voice: str) -> list[str]:
        result = subprocess.run(
            ["espeak-ng", "-q", "-b", "1", "--ipa", "-v", voice, "--stdin"],
            input=sentence.encode(), capture_output=True, timeout=30, check=False,
        )
        if result.returncode != 0:
            raise InvalidRequestError(
                f"espeak-ng could not phonemize the input: {result.stderr.decode()[:200]}",
                param="input",
            )
        return result.stdout.decode().splitlines()

    def close(self) -> None:
        pass


class LibraryPhonemizer:
    """One helper process for the voice; requests from several threads take turns on it
    (a sentence takes well under a millisecond there, less than starting a program)."""

    name = "libespeak-ng (espeakng-loader wheel) in a helper process"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None
        self._start()

    def _start(self) -> None:
        process = subprocess.Popen(
            [sys.executable, str(HELPER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, encoding="utf-8", bufsize=1,
        )
        first = json.loads(_read_line(process) or '{"error": "the helper exited at start"}')
        if "error" in first:
            process.kill()
            raise ModelLoadError(f"the espeak-ng helper did not start: {first['error']}")
        self._process = process

    def clauses(self, sentence: str, voice: str) -> list[str]:
        request = json.dumps({"voice": voice, "text": sentence}, ensure_ascii=False)
        with self._lock:
            reply = self._ask(request)
        if "error" in reply:
            raise InvalidRequestError(
                f"espeak-ng could not phonemize the input: {reply['error'][:200]}",
                param="input",
            )
        return list(reply["clauses"])

    def _ask(self, request: str) -> dict[str, list[str] | str]:
        """One line out, one line back; a helper that died is started again once."""
        for attempt in (1, 2):
            process = self._process
            try:
                assert process is not None and process.stdin is not None
                process.stdin.write(request + "\n")
                process.stdin.flush()
                line = _read_line(process)
                if line:
                    return dict(json.loads(line))
            except (BrokenPipeError, OSError, AssertionError):
                pass
            if attempt == 1:
                self.close()
                self._start()
        raise ModelLoadError("the espeak-ng helper process keeps exiting")

    def close(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait(timeout=5)


def _read_line(process: subprocess.Popen[str]) -> str:
    stdout: IO[str] | None = process.stdout
    return stdout.readline() if stdout is not None else ""


def library_installed() -> bool:
    return importlib.util.find_spec("espeakng_loader") is not None


def choose_phonemizer(choice: PhonemizerChoice) -> Phonemizer:
    """The phonemizer the voice's options ask for; "auto" prefers the wheel (no system
    package needed, one process for all sentences)."""
    if choice in ("auto", "library") and library_installed():
        return LibraryPhonemizer()
    if choice in ("auto", "program") and shutil.which("espeak-ng") is not None:
        return ProgramPhonemizer()
    wanted = {"auto": "espeak-ng", "library": "the espeakng-loader wheel",
              "program": "the espeak-ng program"}[choice]
    raise ModelLoadError(f"the voice needs {wanted} for its phonemes: {INSTALL_HINT}")
