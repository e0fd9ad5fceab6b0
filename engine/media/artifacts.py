"""Generated files (images now; speech, video and music later) under the data dir, served at
`/v1/files/{id}/content` so responses can carry a `url`. Ids are random and checked against a
strict pattern before any path is built, so a request can never name a file outside the
store. Files expire after `artifact_ttl_s`."""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from engine.core.errors import NotFoundError

log = logging.getLogger(__name__)

_ID = re.compile(r"^file-[A-Za-z0-9_-]{20,64}$")


@dataclass(frozen=True)
class Artifact:
    id: str
    path: Path
    media_type: str
    filename: str
    bytes: int
    created_at: int
    expires_at: int


class ArtifactStore:
    def __init__(self, root: Path, ttl_s: float):
        self.root = root
        self.ttl_s = ttl_s

    def put(self, data: bytes, media_type: str, suffix: str,
            ttl_s: float | None = None) -> Artifact:
        """Write a file (blocking: call from a worker thread) and return its record."""
        self.root.mkdir(parents=True, exist_ok=True)
        artifact_id = f"file-{secrets.token_urlsafe(24)}"
        path = self.root / f"{artifact_id}.{suffix}"
        now = int(time.time())
        artifact = Artifact(
            id=artifact_id, path=path, media_type=media_type, filename=path.name,
            bytes=len(data), created_at=now, expires_at=now + int(ttl_s or self.ttl_s),
        )
        staging = path.with_suffix(".partial")
        staging.write_bytes(data)
        staging.rename(path)
        meta = {"media_type": media_type, "suffix": suffix, "created_at": now,
                "expires_at": artifact.expires_at}
        self._meta_path(artifact_id).write_text(json.dumps(meta))
        return artifact

    def _meta_path(self, artifact_id: str) -> Path:
        # Not `{id}.json`: that is where a JSON artifact's own content goes.
        return self.root / f"{artifact_id}.meta.json"

    def get(self, artifact_id: str) -> Artifact:
        """The file's record; unknown, malformed and expired ids are all a 404."""
        missing = NotFoundError(f"No file with id {artifact_id!r} (it may have expired)",
                                param="file_id")
        if not _ID.match(artifact_id):
            raise missing
        try:
            meta = json.loads(self._meta_path(artifact_id).read_text())
        except (OSError, ValueError):
            raise missing from None
        path = self.root / f"{artifact_id}.{meta['suffix']}"
        if meta["expires_at"] <= time.time() or not path.is_file():
            raise missing
        return Artifact(
            id=artifact_id, path=path, media_type=meta["media_type"], filename=path.name,
            bytes=path.stat().st_size, created_at=meta["created_at"],
            expires_at=meta["expires_at"],
        )

    def purge_expired(self) -> int:
        """Delete expired files; returns how many. Blocking: call from a worker thread."""
        if not self.root.is_dir():
            return 0
        now, removed = time.time(), 0
        for meta_path in self.root.glob("file-*.meta.json"):
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                continue
            if meta.get("expires_at", 0) <= now:
                artifact_id = meta_path.name.removesuffix(".meta.json")
                (self.root / f"{artifact_id}.{meta.get('suffix', '')}").unlink(missing_ok=True)
                meta_path.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.info("removed %d expired files", removed)
        return removed
