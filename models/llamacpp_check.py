"""Does this llama.cpp build run here? Asked before ember loads a model on it.

A native build can crash the whole process in its first decode (llama.cpp#20824: a native
build segfaults on Xeons with AMX), so the first decode happens in a child process:
`python -m models.llamacpp_check GGUF_PATH` loads the file, prefills a short prompt, decodes
one token and exits 0. A pass is cached per (llama-cpp-python version, shared libraries,
GGUF file), so later starts skip the child.

Nothing here imports llama_cpp in the calling process: even loading the library must not be
able to take the server down before the child has tried it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path

CHECK_TIMEOUT_S = 120
# Long enough (~50 tokens) for the batched matrix kernels a real prompt runs.
_PROMPT = " ".join(["The capital of France is Paris."] * 7)
_STAGE_PREFIX = "stage: "
_ERROR_PREFIX = "error: "


def _package_dir() -> Path | None:
    try:
        spec = find_spec("llama_cpp")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def llama_cpp_available() -> str | None:
    """None when llama-cpp-python is installed, else why not. Cheap: it finds the package
    without importing it (check_build's child imports it)."""
    if _package_dir() is None:
        return ("llama-cpp-python is not installed (scripts/install_llama_cpp.sh builds it)")
    return None


def _library_files() -> list[Path]:
    """The shared libraries llama_cpp loads (libllama and the ggml backends it links)."""
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    package = _package_dir()
    folder = Path(override) if override else package / "lib" if package else None
    if folder is None or not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and (".so" in p.name or p.suffix in (".dylib", ".dll")))


def _cache_key(gguf_path: Path) -> str:
    from engine.core.sources import file_fingerprint

    try:
        version = metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        version = "unknown"
    parts = [version, sys.executable, file_fingerprint(gguf_path)]
    parts += [f"{p.resolve()}:{p.stat().st_mtime_ns}" for p in _library_files()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _crash_reason(returncode: int, stage: str) -> str:
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"llama.cpp crashed with {name} {stage} (exit {returncode})"


def check_build(gguf_path: Path, cache_dir: Path) -> str | None:
    """None when llama.cpp loads `gguf_path` and decodes with it in a child process, else a
    one-line reason. A pass is remembered in `cache_dir`; a failure is not (it is retried
    on the next load, e.g. after a rebuild)."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        return f"{gguf_path} is not a file"
    marker = Path(cache_dir) / f"passed-{_cache_key(gguf_path)}.json"
    if marker.is_file():
        return None
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "models.llamacpp_check", str(gguf_path)]
    try:
        child = subprocess.run(command, capture_output=True, text=True, env=env,
                               timeout=CHECK_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return f"llama.cpp's decode check did not finish in {CHECK_TIMEOUT_S} s"
    lines = child.stdout.splitlines()
    stages = [line.removeprefix(_STAGE_PREFIX) for line in lines
              if line.startswith(_STAGE_PREFIX)]
    if child.returncode < 0:
        return _crash_reason(child.returncode, stages[-1] if stages else "at start-up")
    if child.returncode != 0:
        errors = [line.removeprefix(_ERROR_PREFIX) for line in lines
                  if line.startswith(_ERROR_PREFIX)]
        tail = (child.stderr.strip().splitlines() or [""])[-1]
        return errors[-1] if errors else (
            f"llama.cpp's decode check failed (exit {child.returncode}): {tail}")
    marker.parent.mkdir(parents=True, exist_ok=True)
    staging = marker.with_name(marker.name + f".tmp{os.getpid()}")
    staging.write_text(json.dumps({"gguf": str(gguf_path), "libraries": [
        str(p) for p in _library_files()]}))
    staging.replace(marker)
    return None


# -- the child ---------------------------------------------------------------------------------


def _stage(text: str) -> None:
    """Where the child is, flushed so that the parent knows it even after a crash."""
    print(_STAGE_PREFIX + text, flush=True)


def _run_check(gguf_path: str) -> int:
    """Load, prefill a short prompt, decode one token; 0 when it all worked."""
    _stage("while importing llama_cpp")
    try:
        import ctypes

        import llama_cpp
    except Exception as exc:  # any import failure (a missing libgomp, ...) is the reason
        print(f"{_ERROR_PREFIX}llama_cpp cannot be imported: {type(exc).__name__}: {exc}",
              flush=True)
        return 1
    errors: list[str] = []

    @llama_cpp.llama_log_callback
    def keep_errors(level: int, text: bytes | None, _user_data: ctypes.c_void_p) -> None:
        if level == 4 and text:  # GGML_LOG_LEVEL_ERROR
            errors.append(text.decode("utf-8", errors="replace").strip())

    llama_cpp.llama_log_set(keep_errors, ctypes.c_void_p(0))
    _stage("in llama_backend_init")
    llama_cpp.llama_backend_init()
    _stage("while loading the model")
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(gguf_path.encode(), params)
    if not model:
        why = f": {errors[0]}" if errors else ""  # the first says why (bad magic, ...)
        print(f"{_ERROR_PREFIX}llama.cpp cannot load {Path(gguf_path).name}{why}", flush=True)
        return 1
    context_params = llama_cpp.llama_context_default_params()
    context_params.n_ctx = context_params.n_batch = context_params.n_ubatch = 256
    context_params.n_seq_max = 2
    context_params.n_threads = context_params.n_threads_batch = min(4, os.cpu_count() or 1)
    ctx = llama_cpp.llama_init_from_model(model, context_params)
    if not ctx:
        print(f"{_ERROR_PREFIX}llama.cpp cannot create a context", flush=True)
        return 1
    vocab = llama_cpp.llama_model_get_vocab(model)
    data = _PROMPT.encode()
    ids = (llama_cpp.llama_token * (len(data) + 8))()
    count = llama_cpp.llama_tokenize(vocab, data, len(data), ids, len(ids), True, False)
    batch = llama_cpp.llama_batch_init(64, 0, 1)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)

    def decode(tokens: list[int], start: int) -> int:
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(tokens) - 1
        batch.n_tokens = len(tokens)
        status = llama_cpp.llama_decode(ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        logits = llama_cpp.llama_get_logits_ith(ctx, len(tokens) - 1)
        row = [logits[i] for i in range(n_vocab)]
        if any(value != value for value in row):  # NaN: a broken kernel, not a crash
            raise RuntimeError("llama_decode returned NaN logits")
        return max(range(n_vocab), key=row.__getitem__)

    try:
        _stage("in its first decode")  # prompt tokens: the matrix-matrix kernels
        token = decode(list(ids[:count]), 0)
        _stage("in its first one-token decode")  # the matrix-vector kernels
        decode([token], count)
    except RuntimeError as exc:
        print(f"{_ERROR_PREFIX}llama.cpp {exc}", flush=True)
        return 1
    _stage("while freeing the model")
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    _stage("at exit")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m models.llamacpp_check GGUF_PATH")
    sys.exit(_run_check(sys.argv[1]))
