"""Structured output: grammars that the generation core enforces token by token.

A request's `OutputConstraint` (JSON object, JSON Schema, tool calls) becomes one llguidance
grammar. `GrammarCompiler` (one per loaded chat model) checks and compiles it into a matcher
off the compute thread, cached by grammar text; every sequence of the request then gets its
own copy, keyed by the sequence (never by a batch row), whose token mask is applied to that
sequence's logits row before sampling and which advances with each accepted token. The mask
covers every backend alike: it is applied to the logits the backend returns.

A schema feature llguidance cannot enforce is refused (a 400 naming it), never quietly
dropped to a prompt-only hint.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import llguidance
import numpy as np

from engine.contracts.chat import OutputConstraint, ResponseFormat, ToolSpec
from engine.contracts.chat_templates import ToolFormat
from engine.core.errors import InvalidRequestError

log = logging.getLogger(__name__)

# JSON as a model writes it best and a client parses it anywhere: `{"a": 1, "b": [2, 3]}`.
# Flexible whitespace would let an unsure model pad a reply with newlines to max_tokens.
_JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}
ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}
_CACHED_GRAMMARS = 128
# Calls one reply may make with parallel_tool_calls (real models make one to three; a
# model that loops on calls stops here instead of at max_tokens).
MAX_CALLS = 8


def _json_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The schema with ember's JSON layout; a schema's own x-guidance options win."""
    return {**schema, "x-guidance": {**_JSON_OPTIONS, **schema.get("x-guidance", {})}}


def response_format_grammar(response_format: ResponseFormat) -> str:
    schema = (response_format.schema if response_format.type == "json_schema"
              else ANY_JSON_OBJECT)
    try:
        return str(llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(_json_schema(schema or ANY_JSON_OBJECT))))
    except (ValueError, TypeError) as exc:
        raise InvalidRequestError(f"the JSON schema is not valid: {exc}",
                                  param="response_format") from exc


def _lark_literal(text: str, special: Callable[[str], bool] = lambda tag: False) -> str:
    """`text` in Lark: quoted, except tags such as `<tool_call>` that are one special token
    of the vocabulary, which the grammar names as tokens (a model writes them as tokens, not
    as the characters '<', 't', ...)."""
    pieces = []
    for part in re.split(r"(<[^<>\s]+>)", text):
        if part and special(part):
            pieces.append(part)
        elif part:
            pieces.append(json.dumps(part))
    return " ".join(pieces)


def _call_rules(prefix: str, tools: list[ToolSpec], parallel: bool, fmt: ToolFormat,
                special: Callable[[str], bool], lines: list[str]) -> tuple[str, str]:
    """Appends one rule per function (`{prefix}_i`: its name, its arguments' schema, the
    call's end) and `{prefix}_next` (a further call); returns the alternation of the
    functions and the repetition that allows further calls."""
    for index, tool in enumerate(tools):
        schema = json.dumps(_json_schema(tool.parameters), separators=(",", ":"))
        lines.append(f"{prefix}_{index}: {_lark_literal(tool.name + fmt.after_name)} "
                     f"%json {schema} {_lark_literal(fmt.after_arguments, special)}")
    functions = "(" + " | ".join(f"{prefix}_{index}" for index in range(len(tools))) + ")"
    lines.append(f"{prefix}_next: {_lark_literal(fmt.separator + fmt.head, special)} "
                 f"{functions}")
    more = f" {prefix}_next{{0,{MAX_CALLS - 1}}}" if parallel else ""
    return functions, more


def tool_call_grammar(tools: tuple[ToolSpec, ...], choice: str, parallel: bool,
                      fmt: ToolFormat, special: Callable[[str], bool] = lambda tag: False
                      ) -> str:
    """A Lark grammar (llguidance's dialect) for the model's tool-call text in `fmt`:

    - `required`: one call (or up to MAX_CALLS, with `parallel`) of a declared function;
    - a function's name: one call of exactly that function;
    - `auto`: free text, or free text then calls once the model writes the opening tag
      (a lazy trigger: nothing is constrained until it appears).

    A call's arguments are constrained by its function's `parameters` schema."""
    allowed = [tool for tool in tools if choice in ("auto", "required") or tool.name == choice]
    lines = ["%llguidance {}"]
    functions, more = _call_rules("fn", allowed, parallel, fmt, special, lines)
    if choice == "auto" and fmt.open:
        # A reply may also open with the call's JSON alone (see ToolFormat.bare).
        bare = fmt.bare()
        bare_functions, bare_more = _call_rules("bare", allowed, parallel, bare, special, lines)
        lines += [f"bare_opener[lazy]: {_lark_literal(bare.head)}",
                  f"bare_calls: bare_opener {bare_functions}{bare_more}"]
    if choice == "auto":
        rest = fmt.head[len(fmt.trigger):]
        if special(fmt.trigger):  # a token of its own: free text cannot contain it
            opener = f"TEXT {fmt.trigger}"
        else:  # lazy: matched as soon as the text ends in it
            lines.append(f"opener[lazy]: TEXT {_lark_literal(fmt.trigger)}")
            opener = "opener"
        lines += ["start: TEXT | calls" + (" | bare_calls" if fmt.open else ""),
                  f"calls: {opener} {_lark_literal(rest, special)} {functions}{more}",
                  r"TEXT: /(.|\n)*/"]
    else:
        lines += ["start: calls",
                  f"calls: {_lark_literal(fmt.head, special)} {functions}{more}"]
    return str(llguidance.LLMatcher.grammar_from_lark("\n".join(lines) + "\n"))


def _check_schema(schema: Mapping[str, Any], param: str) -> None:
    """A 400 for a schema llguidance cannot enforce (checked with no model loaded)."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(_json_schema(schema)))
    except (ValueError, TypeError) as exc:
        raise InvalidRequestError(f"{param} is not a valid JSON schema: {exc}",
                                  param=param) from exc
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error or messages:
        raise InvalidRequestError(f"{param} cannot be enforced: {'; '.join(messages)}",
                                  param=param)


def check_constraint(constraint: OutputConstraint) -> None:
    """Every field of a constraint checked before any model work: declared tools with
    distinct names and enforceable schemas, a tool_choice that names one of them."""
    names = [tool.name for tool in constraint.tools]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise InvalidRequestError(f"two tools are named {name!r}; names must differ",
                                      param=f"{constraint.tools_param}[{index}]")
    choice = constraint.tool_choice
    if choice not in ("auto", "none", "required") and choice not in names:
        raise InvalidRequestError(f"tool_choice names {choice!r}, which is not in tools",
                                  param=constraint.tool_choice_param)
    if choice != "auto" and choice != "none" and not names:
        raise InvalidRequestError(f"tool_choice {choice!r} needs tools",
                                  param=constraint.tool_choice_param)
    for index, tool in enumerate(constraint.tools):
        _check_schema(tool.parameters, constraint.tool_parameters_param.format(index=index))
    response_format = constraint.response_format
    if response_format is not None and response_format.type == "json_schema":
        if not isinstance(response_format.schema, Mapping):
            raise InvalidRequestError("the JSON schema must be an object",
                                      param=constraint.param)
        _check_schema(response_format.schema, constraint.param)


def constraint_grammar(constraint: OutputConstraint, fmt: ToolFormat | None,
                       special: Callable[[str], bool] = lambda tag: False) -> str | None:
    """The grammar a request's output must follow, or None when it is free text."""
    if constraint.calls_tools:
        assert fmt is not None
        return tool_call_grammar(constraint.tools, constraint.tool_choice,
                                 constraint.parallel_tool_calls, fmt, special)
    if constraint.response_format is not None and constraint.response_format.type != "text":
        return response_format_grammar(constraint.response_format)
    return None


class GrammarCompiler:
    """Compiles grammars for one chat model's vocabulary. Thread-safe; run it off the event
    loop and off the compute thread (the vocabulary takes ~0.5 s once, a grammar ~1 ms to
    100s of ms)."""

    def __init__(self, make_tokenizer: Callable[[], Any]):
        self._make_tokenizer = make_tokenizer
        self._tokenizer: Any = None
        self._lock = threading.Lock()
        self._compiled: OrderedDict[str, Any] = OrderedDict()

    def tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self._make_tokenizer()
            return self._tokenizer

    def is_special(self, text: str) -> bool:
        """Is `text` exactly one special token of this vocabulary?"""
        tokenizer = self.tokenizer()
        ids = tokenizer.tokenize_str(text)
        return len(ids) == 1 and bool(tokenizer.is_special_token(ids[0]))

    def compile_constraint(self, constraint: OutputConstraint, fmt: ToolFormat) -> Any:
        """A matcher for the request's constraint, or None when its output is free."""
        grammar = constraint_grammar(constraint, fmt, self.is_special)
        return None if grammar is None else self.compile(grammar, constraint.param)

    def compile(self, grammar: str, param: str) -> Any:
        """A fresh matcher for `grammar` at its start, or a 400 naming what it cannot do."""
        tokenizer = self.tokenizer()
        with self._lock:
            template = self._compiled.get(grammar)
            if template is not None:
                self._compiled.move_to_end(grammar)
                return template.deep_copy()
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, tokenizer)
        if is_error or messages:  # a warning is a feature it would not enforce
            detail = "; ".join(messages)
            raise InvalidRequestError(f"{param} cannot be enforced: {detail}", param=param)
        template = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if template.is_error():
            raise InvalidRequestError(f"{param} cannot be enforced: {template.get_error()}",
                                      param=param)
        with self._lock:
            self._compiled[grammar] = template
            while len(self._compiled) > _CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return template.deep_copy()


def mask_logits(matcher: Any, row: np.ndarray) -> None:
    """In place: every token the grammar does not allow next gets -inf."""
    bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
    allowed = np.unpackbits(bits, bitorder="little", count=len(row)).astype(bool)
    if not allowed.any():  # the vocabulary cannot continue the grammar
        raise RuntimeError(f"the output grammar allows no next token: {matcher.get_error()}")
    row[~allowed] = -np.inf
