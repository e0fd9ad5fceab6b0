"""Tool calls parsed out of a streamed reply, in the format its chat template speaks (the
formats: engine/contracts/chat_templates.py): content and OpenAI-style calls, incrementally."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from engine.contracts.chat import ToolCall, ToolCallDelta
from engine.contracts.chat_templates import ToolFormat


def join_deltas(deltas: Sequence[ToolCallDelta]) -> list[ToolCall]:
    """One choice's streamed call pieces as whole calls, in call order."""
    calls: dict[int, list[str]] = {}
    for delta in deltas:
        call = calls.setdefault(delta.call, [delta.id or "", delta.name or "", ""])
        call[2] += delta.arguments
    return [ToolCall(*calls[index]) for index in sorted(calls)]


def new_call_id() -> str:
    return "call_" + secrets.token_urlsafe(18)


class ToolCallParser:
    """Splits one choice's streamed text into content and tool calls in `fmt`.

    Text that could still turn into a call's opening is held back, so a half tag never
    goes out as content. Once a call opens, its name is sent as soon as it is complete and
    its arguments piece by piece; the grammar guarantees the shape, so the parse is exact.

    A call identical to an earlier one of the reply (same function, same arguments) is
    dropped: small models asked for parallel calls repeat one until the limit. While a call
    can still turn out a repeat, its pieces are held back."""

    def __init__(self, index: int, fmt: ToolFormat):
        self.index = index
        self.fmt = fmt
        self.calls: list[ToolCall] = []
        self._buffer = ""  # text not yet sent
        self._in_call = False
        self._started = not fmt.open  # past the point where a bare call could begin
        self._name: str | None = None
        self._id = ""
        self._arguments = ""
        self._held: list[ToolCallDelta] = []  # pieces of a call that may repeat an earlier one

    def feed(self, text: str) -> list[str | ToolCallDelta]:
        """Content strings and call deltas that are final after `text`."""
        self._buffer += text
        out: list[str | ToolCallDelta] = []
        while True:
            if not self._started and self.fmt.open:
                start = self._buffer.lstrip()
                bare = self.fmt.bare().head
                if bare.startswith(start):
                    return []  # may still become a bare call
                self._started = True
                if start.startswith(bare):
                    self.fmt = self.fmt.bare()
                    self._buffer = start
            if not self._in_call:
                at = self._buffer.find(self.fmt.head)
                if at < 0:
                    # Held back: a possible start of a call, and trailing whitespace (it
                    # belongs to the content only if more text follows).
                    partial = _partial_suffix(self._buffer, self.fmt.head)
                    before = self._buffer[:len(self._buffer) - partial]
                    keep = len(self._buffer) - len(before.rstrip())
                    if len(self._buffer) > keep:
                        out.append(self._buffer[:len(self._buffer) - keep])
                        self._buffer = self._buffer[len(self._buffer) - keep:]
                    return [piece for piece in out if piece != ""]
                out.append(self._buffer[:at].rstrip())
                self._buffer = self._buffer[at + len(self.fmt.head):]
                self._in_call, self._name, self._arguments = True, None, ""
            if self._name is None:
                end = self._buffer.find(self.fmt.after_name)
                if end < 0:
                    return [piece for piece in out if piece != ""]
                self._name = self._buffer[:end]
                self._id = new_call_id()
                self._buffer = self._buffer[end + len(self.fmt.after_name):]
                self._send(ToolCallDelta(self.index, len(self.calls), self._id, self._name), out)
            # A call ends at its closing text; without one (llama3), where the next begins.
            # Neither can occur inside the JSON: its strings escape newlines.
            end_marker = self.fmt.after_arguments if self.fmt.close else (
                "}" + self.fmt.separator + self.fmt.head)
            closing = self._buffer.find(end_marker)
            if closing >= 0:
                consumed = len(end_marker) if self.fmt.close else 1
                piece, self._buffer = self._buffer[:closing], self._buffer[closing + consumed:]
                self._finish_call(piece, out)
                continue
            keep = _partial_suffix(self._buffer, end_marker) or (
                0 if self.fmt.close else int(self._buffer.endswith("}")))
            if len(self._buffer) > keep:
                piece = self._buffer[:len(self._buffer) - keep]
                self._buffer = self._buffer[len(self._buffer) - keep:]
                self._arguments += piece
                self._send(ToolCallDelta(self.index, len(self.calls), arguments=piece), out)
            return [piece for piece in out if piece != ""]

    def _may_repeat(self) -> bool:
        return any(call.name == self._name and call.arguments.startswith(self._arguments)
                   for call in self.calls)

    def _send(self, delta: ToolCallDelta, out: list[str | ToolCallDelta]) -> None:
        """Out now, unless the call so far could still be a repeat: then held."""
        self._held.append(delta)
        if not self._may_repeat():
            out += self._held
            self._held = []

    def _finish_call(self, piece: str, out: list[str | ToolCallDelta]) -> None:
        self._arguments += piece
        if piece:
            self._send(ToolCallDelta(self.index, len(self.calls), arguments=piece), out)
        repeat = any(call.name == self._name and call.arguments == self._arguments
                     for call in self.calls)
        if not repeat:
            out += self._held
            self.calls.append(ToolCall(self._id, self._name or "", self._arguments))
        self._held = []
        self._in_call, self._name = False, None

    def finish(self) -> list[str | ToolCallDelta]:
        """The reply ended: what is left. A call without a closing tag (llama3 format, or a
        reply cut by max_tokens) ends where the text ends."""
        out: list[str | ToolCallDelta] = []
        if self._in_call and self._name is not None:
            text = self._buffer
            if not self.fmt.close and text.endswith("}"):
                text = text[:-1]  # llama3: the call object's own closing brace
            self._buffer = ""
            self._finish_call(text, out)
        elif not self._in_call and not self.calls:
            out.append(self._buffer)
        self._buffer = ""
        return [piece for piece in out if piece != ""]


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a start of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
