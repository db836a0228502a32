"""OpenAI tool calling: the conventions of real chat templates, parsed and rendered.

References: llama.cpp's own chat tests (tests/test-chat.cpp in the sdist: the model outputs it parses for
Hermes 2 Pro / Hermes 3 / Qwen 2.5 and Mistral Nemo, with the calls it expects), the format Meta's
Llama 3.1 template asks for in its own text, the real templates from llama.cpp's models/templates, and
transformers' ``apply_chat_template(..., tools=...)`` for rendering.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from qadapt.server import tools as T

SPECIAL = {"type": "function", "function": {"name": "special_function", "description": "I'm special",
                                            "parameters": {"type": "object", "properties": {"arg1": {
                                                "type": "integer", "description": "The arg."}}, "required": ["arg1"]}}}
CALL = [T.Call("special_function", json.dumps({"arg1": 1}))]


def template(root, name):
    return (root / "models" / "templates" / f"{name}.jinja").read_text()


@pytest.mark.parametrize("name,style", [("Qwen-Qwen2.5-7B-Instruct", "hermes"),
                                        ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use", "hermes"),
                                        ("NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use", "hermes"),
                                        ("meta-llama-Llama-3.1-8B-Instruct", "llama3"),
                                        ("mistralai-Mistral-Nemo-Instruct-2407", "mistral"),
                                        ("unsloth-mistral-Devstral-Small-2507", "mistral")])
def test_style_of_real_templates(llama_root, name, style):
    path = llama_root / "models" / "templates" / f"{name}.jinja"
    if not path.exists():
        pytest.skip(f"{name} not in this llama.cpp")
    assert T.style_of(path.read_text()) == style


# (style, model output, expected content, expected calls): the first three are llama.cpp's test-chat.cpp cases
CASES = [
    ("hermes", '<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}\n</tool_call>', None, CALL),
    ("hermes", 'Hello, world!\nWhat\'s up?<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}'
               '</tool_call>', "Hello, world!\nWhat's up?", CALL),
    ("mistral", '[TOOL_CALLS][{"name": "special_function", "arguments": {"arg1": 1}, "id": "123456789"}]', None, CALL),
    ("mistral", '[TOOL_CALLS]special_function[ARGS]{"arg1": 1}', None, CALL),  # v11+ (Devstral, Ministral)
    ("llama3", '{"name": "special_function", "parameters": {"arg1": 1}}', None, CALL),  # Meta's template asks this
    ("llama3", '<|python_tag|>{"name": "special_function", "parameters": {"arg1": 1}}', None, CALL),
    ("llama3", '{"name": "a", "parameters": {"s": "x;}"}}; {"name": "b", "parameters": {}}', None,
     [T.Call("a", '{"s": "x;}"}'), T.Call("b", "{}")]),
    ("json", '{"name": "special_function", "arguments": "{\\"arg1\\": 1}"}', None, CALL),
    ("hermes", "Hello, world!\nWhat's up?", "Hello, world!\nWhat's up?", []),
    ("llama3", "{not a call}", "{not a call}", []),
    ("mistral", "[TOOL_CALLS] not json", "[TOOL_CALLS] not json", []),
]


@pytest.mark.parametrize("style,text,content,calls", CASES)
def test_parse(style, text, content, calls):
    got_content, got_calls = T.parse(text, style)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("name", ["Qwen-Qwen2.5-7B-Instruct", "meta-llama-Llama-3.1-8B-Instruct",
                                  "mistralai-Mistral-Nemo-Instruct-2407"])
def test_tools_and_tool_results_render_as_transformers_renders_them(llama_root, tmp_path, name):
    from llama_sdist import llama3_folder_tokenizer
    from transformers import AutoTokenizer

    from qadapt.formats.gguf import GGUFFile
    from qadapt.server.openai_schemas import ChatRequest
    from qadapt.tokenizer import Tokenizer

    tpl = template(llama_root, name)
    body = ChatRequest.parse({"model": "m", "tools": [SPECIAL], "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Call it."},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "123456789", "type": "function", "function": {
            "name": "special_function", "arguments": "{\"arg1\": 1}"}}]},
        {"role": "tool", "tool_call_id": "123456789", "content": "ok"}]})
    messages = T.template_messages(body.messages)
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    ours = Tokenizer.from_gguf(GGUFFile(llama_root / "models" / "ggml-vocab-llama-bpe.gguf"))
    hf = AutoTokenizer.from_pretrained(str(llama3_folder_tokenizer(llama_root, tmp_path / "tok")))
    want = hf.apply_chat_template([dict(m) for m in messages], tools=tools, chat_template=tpl, tokenize=False,
                                  add_generation_prompt=True, **ours.special_tokens)
    got = ours.render_chat(messages, tpl, tools=tools)
    assert got == want and "special_function" in got


def test_streamed_tool_call_is_held_then_sent_as_tool_calls(llama_root):
    """The stream holds text that may begin a call; a call becomes a tool_calls delta, plain text flows."""
    from qadapt.formats.gguf import GGUFFile
    from qadapt.server.openai_api import _View
    from qadapt.server.openai_schemas import ChatRequest
    from qadapt.server.scheduler import Finish, TokenEvent
    from qadapt.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(GGUFFile(llama_root / "models" / "ggml-vocab-llama-bpe.gguf"))
    server = SimpleNamespace(model=SimpleNamespace(tokenizer=tok, chat_template=template(
        llama_root, "Qwen-Qwen2.5-7B-Instruct")))

    def run(text):
        body = ChatRequest.parse({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [SPECIAL],
                                  "stream": True})
        st = _View(server, body, True, None, True).stream_state(0)
        ids = tok.encode(text, add_special=False)
        chunks, sofar = [], ""
        for i in ids:
            full = tok.decode(ids[:len(chunks) + 1])
            piece, sofar = full[len(sofar):], full
            chunks.append(st.feed(TokenEvent(i, piece, -1.0)))
        chunks.append(st.feed(Finish("eos", sofar, ids, 3, 0.1, len(ids) + 1)))
        return [c for step in chunks for c in step]

    call = run('<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}\n</tool_call>')
    deltas = [c["delta"] for c in call]
    assert not any(d.get("content") for d in deltas)  # nothing of the call leaked as text
    sent = [d["tool_calls"] for d in deltas if d.get("tool_calls")]
    assert len(sent) == 1 and sent[0][0]["function"] == {"name": "special_function", "arguments": '{"arg1": 1}'}
    assert call[-1]["finish_reason"] == "tool_calls"

    plain = run("Hello there, no tools needed.")
    assert "".join(c["delta"].get("content") or "" for c in plain) == "Hello there, no tools needed."
    assert plain[-1]["finish_reason"] == "stop"
    assert sum(1 for c in plain if c["delta"].get("content")) > 2  # streamed, not held to the end
