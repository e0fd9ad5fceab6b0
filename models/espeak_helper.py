"""A separate process that turns text into IPA phonemes with the libespeak-ng that the
`espeakng-loader` wheel ships. ember starts it and talks to it over pipes, so the GPL library
is never loaded into ember's own process (as with the `espeak-ng` program).

It imports nothing from ember. Protocol, one JSON object per line:
  in:  {"voice": "en-us", "text": "One sentence."}
  out: {"clauses": ["wVn sEnt@ns"]}   or   {"error": "..."}
The first line out is {"ready": true} once the library and its data have loaded.
"""

from __future__ import annotations

import ctypes
import json
import sys

AUDIO_OUTPUT_SYNCHRONOUS = 0x02
CHARS_UTF8 = 1
PHONEMES_IPA = 0x02


def load() -> ctypes.CDLL:
    import espeakng_loader

    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
    lib.espeak_TextToPhonemes.argtypes = [
        ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int,
    ]
    data = espeakng_loader.get_data_path().encode()
    if lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data, 0) <= 0:
        raise RuntimeError(f"libespeak-ng did not initialize with data at {data.decode()}")
    return lib


def clauses(lib: ctypes.CDLL, text: str) -> list[str]:
    """One string per clause: espeak consumes the text a clause per call, as its CLI prints a
    clause per line."""
    buffer = ctypes.create_string_buffer(text.encode())
    cursor = ctypes.c_char_p(ctypes.addressof(buffer))
    result = []
    while cursor.value:
        phonemes = lib.espeak_TextToPhonemes(ctypes.byref(cursor), CHARS_UTF8, PHONEMES_IPA)
        result.append((phonemes or b"").decode("utf-8", errors="replace"))
    return result


def main() -> None:
    try:
        lib = load()
    except Exception as error:  # reported to the parent, which decides
        print(json.dumps({"error": f"{type(error).__name__}: {error}"}), flush=True)
        return
    print(json.dumps({"ready": True}), flush=True)
    voice = None
    for line in sys.stdin:
        try:
            message = json.loads(line)
            if message["voice"] != voice:
                if lib.espeak_SetVoiceByName(message["voice"].encode()) != 0:
                    raise ValueError(f"espeak-ng has no voice {message['voice']!r}")
                voice = message["voice"]
            reply: dict[str, object] = {"clauses": clauses(lib, message["text"])}
        except Exception as error:  # one bad line must not end the helper
            reply = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps(reply, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
