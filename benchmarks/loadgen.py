"""A lean HTTP/1.1 load generator on asyncio streams.

On a 2-core machine the client shares the CPU with the server: httpx spent ~9 ms of CPU per
request, about half the machine at 64 concurrent requests, so the benchmark measured the
client. This client sends pre-encoded requests over keep-alive connections and parses only
what it needs (status, Content-Length or chunked bodies), as load generators such as wrk do.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any


class HTTPError(RuntimeError):
    def __init__(self, status: int, body: bytes):
        super().__init__(f"HTTP {status}: {body[:300]!r}")
        self.status = status


class Connection:
    """One keep-alive connection; one request at a time."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> Connection:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()

    def _send(self, path: str, payload: Any) -> None:
        assert self._writer is not None
        body = json.dumps(payload).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json"
                f"\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        self._writer.write(head + body)

    async def _head(self) -> tuple[int, dict[str, str]]:
        assert self._reader is not None
        raw = await self._reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        return status, headers

    async def _chunks(self, headers: dict[str, str]) -> AsyncIterator[bytes]:
        assert self._reader is not None
        if "content-length" in headers:
            yield await self._reader.readexactly(int(headers["content-length"]))
            return
        while True:  # chunked transfer encoding
            size = int((await self._reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await self._reader.readuntil(b"\r\n")
                return
            yield await self._reader.readexactly(size)
            await self._reader.readexactly(2)

    async def post_json(self, path: str, payload: Any) -> Any:
        self._send(path, payload)
        status, headers = await self._head()
        body = b"".join([chunk async for chunk in self._chunks(headers)])
        if status != 200:
            raise HTTPError(status, body)
        return json.loads(body)

    async def stream_events(self, path: str, payload: Any) -> AsyncIterator[dict[str, Any]]:
        """Server-sent `data: {...}` frames, as they arrive, until `data: [DONE]`."""
        self._send(path, payload)
        status, headers = await self._head()
        if status != 200:
            raise HTTPError(status, b"".join([c async for c in self._chunks(headers)]))
        pending = b""
        async for chunk in self._chunks(headers):
            pending += chunk
            *frames, pending = pending.split(b"\n\n")
            for frame in frames:
                data = frame.removeprefix(b"data: ")
                if data != b"[DONE]":
                    yield json.loads(data)
