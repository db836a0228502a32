"""OpenAI tool calling through the model's own conventions.

Tools reach the model through its chat template (transformers' ``tools=`` variable, as
``apply_chat_template(messages, tools=...)`` passes them); what the model writes back is parsed into
OpenAI ``tool_calls`` by the convention its template teaches, told apart by the template's text:

=========  ===================================================  ============================================
style      template contains                                    the model writes
=========  ===================================================  ============================================
hermes     ``<tool_call>`` (Qwen 2.5/3, Hermes, many fine-tunes) ``<tool_call>{"name": .., "arguments": ..}</tool_call>``
mistral    ``[TOOL_CALLS]``                                     ``[TOOL_CALLS][{"name": .., "arguments": ..}]``
                                                                 or ``[TOOL_CALLS]name[ARGS]{..}`` (v11+)
llama3     ``<|python_tag|>`` or Llama 3's header tokens         ``{"name": .., "parameters": ..}`` (``;``-joined)
json       anything else                                        one JSON object with ``name`` and arguments
=========  ===================================================  ============================================

``tool_choice: "required"`` and a named tool are not left to the model: the output is constrained to a
JSON array of calls, or to the named function's parameters (vLLM's approach), so the calls always parse.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any


STYLES = ("hermes", "mistral", "llama3", "json")
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_MISTRAL_V11 = re.compile(r"([A-Za-z0-9_.\-]+)\[ARGS\]")


@dataclass
class Call:
    name: str
    arguments: str  # a JSON text, as OpenAI sends it

    def openai(self, index: int | None = None) -> dict[str, Any]:
        out = {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
               "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            out["index"] = index
        return out


def style_of(template: str | None) -> str:
    t = template or ""
    if "<tool_call>" in t:
        return "hermes"
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<|python_tag|>" in t or "<|start_header_id|>" in t:
        return "llama3"
    return "json"


def markers(style: str) -> tuple[str, ...]:
    """Text that begins a tool call in ``style`` (the output is held while it could still be one)."""
    return {"hermes": ("<tool_call>",), "mistral": ("[TOOL_CALLS]",), "llama3": ("<|python_tag|>", "{"),
            "json": ("{",)}[style]


def template_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """OpenAI messages as chat templates read them: ``tool_calls[].function.arguments`` as objects
    (Llama 3's template writes ``arguments | tojson``), ``tool`` results with their ids."""
    out = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.name:
            d["name"] = m.name
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.function.name, "arguments": _as_object(c.function.arguments)}}
                               for c in m.tool_calls]
        out.append(d)
    return out


def _as_object(args: str | dict) -> Any:
    if isinstance(args, dict):
        return args
    try:
        return json.loads(args)
    except json.JSONDecodeError:
        return args


def parse(text: str, style: str) -> tuple[str | None, list[Call]]:
    """(content, calls) of a completion written in ``style``; no calls when it holds none that parse."""
    stripped = text.strip()
    if style == "hermes":
        calls = [c for c in (_call(_loads(m)) for m in _HERMES.findall(stripped)) if c]
        content = _HERMES.sub("", stripped).strip() if calls else stripped
        return (content or None), calls
    if style == "mistral" and "[TOOL_CALLS]" in stripped:
        head, _, body = stripped.partition("[TOOL_CALLS]")
        calls = _mistral(body.strip())
        return (head.strip() or None) if calls else stripped, calls
    if style == "llama3":
        body = stripped.removeprefix("<|python_tag|>").strip()
        parts = [_call(_loads(p)) for p in _split_semicolons(body)] if body.startswith("{") else []
        if parts and all(parts):
            return None, parts  # type: ignore[return-value]
        return stripped, []
    call = _call(_loads(stripped)) if stripped.startswith("{") else None
    return (None, [call]) if call else (stripped, [])


def _mistral(body: str) -> list[Call]:
    if body.startswith("["):
        items = _loads(body)
        if isinstance(items, list):
            calls = [_call(i) for i in items]
            return calls if all(calls) else []  # type: ignore[return-value]
        return []
    calls = []
    pieces = _MISTRAL_V11.split(body)  # ['', name, args, name, args, ...]
    for name, args in zip(pieces[1::2], pieces[2::2]):
        args = args.strip().removesuffix("[TOOL_CALLS]").strip()
        if _loads(args) is None:
            return []
        calls.append(Call(name, json.dumps(_loads(args), ensure_ascii=False)))
    return calls


def _split_semicolons(body: str) -> list[str]:
    out, depth, start, in_str, esc = [], 0, 0, False, False
    for i, ch in enumerate(body):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == ";" and depth == 0:
            out.append(body[start:i])
            start = i + 1
    out.append(body[start:])
    return [p.strip() for p in out if p.strip()]


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None


def _call(obj: Any) -> Call | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        parsed = _loads(args)
        args = parsed if parsed is not None else args
    return Call(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


# ---------------------------------------------------------------------- forced calls
def required_schema(tools: list[Any]) -> dict[str, Any]:
    """``tool_choice: "required"``: a non-empty JSON array of calls to the given tools (vLLM's schema)."""
    return {"type": "array", "minItems": 1, "items": {"anyOf": [
        {"type": "object", "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                          "parameters": t.function.parameters or {"type": "object"}},
         "required": ["name", "parameters"], "additionalProperties": False} for t in tools]}}


def named_schema(tools: list[Any], name: str) -> dict[str, Any]:
    """A named ``tool_choice``: the output is that function's arguments."""
    tool = next(t for t in tools if t.function.name == name)
    return tool.function.parameters or {"type": "object"}


def forced_calls(text: str, choice: Any) -> list[Call]:
    """The calls of a constrained output (``choice``: "required" or the named tool); none when it does not
    parse (the length limit cut it: the text is then returned as content, finish_reason "length")."""
    obj = _loads(text)
    if choice == "required":
        if not isinstance(obj, list):
            return []
        return [Call(o["name"], json.dumps(o.get("parameters", {}), ensure_ascii=False)) for o in obj]
    if obj is None:
        return []
    return [Call(choice.function["name"], json.dumps(obj, ensure_ascii=False))]
