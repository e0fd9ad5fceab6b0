"""The artifact store: random ids, strict id checks (no path traversal), expiry."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from engine.core.errors import NotFoundError
from engine.media.artifacts import ArtifactStore


def test_put_then_get_and_ids_are_random(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "files", ttl_s=60)
    first = store.put(b"\x89PNG data", "image/png", "png")
    second = store.put(b"other", "image/png", "png")
    assert first.id != second.id and len(first.id) > 30
    found = store.get(first.id)
    assert found.path.read_bytes() == b"\x89PNG data" and found.media_type == "image/png"
    assert found.path.parent == tmp_path / "files"


@pytest.mark.parametrize("bad", ["../secret", "file-../../etc/passwd", "file-a", "x" * 40,
                                 "file-" + "a" * 30 + "/../b", ""])
def test_malformed_or_unknown_ids_are_not_found(tmp_path: Path, bad: str) -> None:
    (tmp_path / "secret.json").write_text('{"suffix": "txt", "expires_at": 9e18}')
    store = ArtifactStore(tmp_path / "files", ttl_s=60)
    with pytest.raises(NotFoundError):
        store.get(bad)


def test_expired_files_are_gone_and_purged(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, ttl_s=1)
    kept = ArtifactStore(tmp_path, ttl_s=3600).put(b"keep", "image/png", "png")
    old = store.put(b"old", "image/png", "png")
    time.sleep(1.1)
    with pytest.raises(NotFoundError):
        store.get(old.id)
    assert store.purge_expired() == 1
    assert not old.path.exists() and store.get(kept.id).path.exists()
