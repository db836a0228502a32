"""Chat templates, rendered as transformers renders them.

The template comes from the user (``--chat-template FILE``, ``chat_template=`` in the API, the server's
option) or from the model: ``tokenizer_config.json`` / ``chat_template.jinja`` in a transformers folder,
``tokenizer.chat_template`` in a GGUF file. Rendering is transformers' own function (its sandboxed
Jinja environment with ``raise_exception``, ``strftime_now`` and its ``tojson``), given the messages,
``add_generation_prompt`` and the tokenizer's special-token texts, so the prompt a model sees is the
string ``tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)`` gives.
A model without a template refuses chat: there is no silent ``user: ...`` fallback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import InputError, UnsupportedError

Message = Mapping[str, Any]


class NoChatTemplate(InputError):
    """Chat was asked of a model that has no chat template and none was given."""


def read_template(source: str | os.PathLike) -> str:
    """A chat template from a file (``.jinja``, or a ``tokenizer_config.json`` holding ``chat_template``)."""
    path = Path(source)
    if not path.is_file():
        raise InputError(f"chat template file {path} does not exist")
    text = path.read_text("utf-8")
    if path.suffix == ".json":
        import json

        try:
            text = json.loads(text)["chat_template"]
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{path}: a JSON chat template file must hold a `chat_template` string") from None
        if isinstance(text, list):  # transformers' named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in text if isinstance(t, dict)}
            text = named.get("default")
        if not isinstance(text, str):
            raise InputError(f"{path}: `chat_template` has no default template string")
    return text


def render(template: str | None, messages: Sequence[Message], special_tokens: Mapping[str, str], *,
           add_generation_prompt: bool = True, where: str = "the model", **kwargs: Any) -> str:
    """``messages`` through ``template``, exactly as transformers' ``apply_chat_template(..., tokenize=False)``."""
    if not template:
        raise NoChatTemplate(
            f"{where} has no chat template; chat needs one: pass --chat-template FILE to `qadapt run` / "
            "`qadapt serve` (or chat_template= to qadapt.load), or send a plain prompt to /v1/completions")
    if not messages:
        raise InputError("a chat needs at least one message")
    try:
        from transformers.utils.chat_template_utils import render_jinja_template
    except ImportError:  # pragma: no cover - transformers older than 4.50
        raise UnsupportedError("chat templates need transformers >= 4.50 (its render_jinja_template)") from None
    chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
    try:
        rendered, _ = render_jinja_template(conversations=[chat], chat_template=template,
                                            add_generation_prompt=add_generation_prompt,
                                            **{**special_tokens, **kwargs})
    except ImportError as e:
        raise UnsupportedError(f"chat templates need jinja2 >= 3.1.6 ({e})") from None
    except Exception as e:  # jinja2's TemplateError, raise_exception() in the template, type errors in it
        raise InputError(f"the chat template of {where} failed on these messages: {type(e).__name__}: {e}") from None
    return rendered[0]
