"""Chat template rendering (jinja2) for OpenAI-style messages with image parts."""

from __future__ import annotations

import functools
import json
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from step3vl.processor.tokens import IMAGE_PLACEHOLDER

# ChatML, used when the checkpoint ships no chat_template. Image parts render as the placeholder that the processor
# expands to the full image token layout. With `tools`, the Hermes layout of Qwen3 (what STEP3-VL is served with):
# the function signatures in the system turn, an assistant's calls as <tool_call> JSON blocks, and consecutive
# tool results in one user turn as <tool_response> blocks.
CHATML_TEMPLATE = """\
{%- macro render_content(content) -%}
  {%- if content is string -%}{{- content -}}
  {%- elif content is not none -%}
    {%- for part in content -%}
      {%- if part['type'] == 'text' -%}{{- part['text'] -}}
      {%- elif part['type'] == 'image' or part['type'] == 'image_url' -%}{{- '""" + IMAGE_PLACEHOLDER + """' -}}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- if tools -%}
  {{- '<|im_start|>system\\n' -}}
  {%- if messages and messages[0]['role'] == 'system' -%}{{- render_content(messages[0]['content']) + '\\n\\n' -}}{%- endif -%}
  {{- '# Tools\\n\\nYou may call one or more functions to help with the user query.\\n\\n'
      'The function signatures are within <tools></tools> XML tags:\\n<tools>' -}}
  {%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}
  {{- '\\n</tools>\\n\\nFor each function call, return a JSON object with the function name and arguments '
      'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n'
      '{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' -}}
{%- endif -%}
{%- for message in messages -%}
  {%- if tools and loop.first and message['role'] == 'system' -%}
  {%- elif message['role'] == 'tool' -%}
    {%- if loop.first or loop.previtem['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
    {{- '\\n<tool_response>\\n' + render_content(message['content']) + '\\n</tool_response>' -}}
    {%- if loop.last or loop.nextitem['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}
  {%- else -%}
    {{- '<|im_start|>' + message['role'] + '\\n' + render_content(message['content']) -}}
    {%- for call in message.get('tool_calls') or [] -%}
      {%- set fn = call['function'] if call['function'] is defined else call -%}
      {%- if not loop.first or message['content'] -%}{{- '\\n' -}}{%- endif -%}
      {{- '<tool_call>\\n{\"name\": ' + (fn['name'] | tojson) + ', \"arguments\": ' -}}
      {{- fn['arguments'] if fn['arguments'] is string else (fn['arguments'] | tojson) -}}
      {{- '}\\n</tool_call>' -}}
    {%- endfor -%}
    {{- '<|im_end|>\\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}
"""


def split_images(messages: list[dict]) -> tuple[list[dict], list[Any]]:
    """Take the image payloads out of the messages, in order.

    Returns copies of the messages whose image parts are reduced to `{"type": "image"}` (what chat
    templates test for) and the list of image sources (anything `load_image` accepts; an `image_url`
    url may be a local path, file:// or data: URL).
    """
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out, images = [], []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg:
            raise ValueError(f"message {i} must be a dict with a 'role', got {msg!r:.200}")
        content = msg.get("content")
        if isinstance(content, list):
            content = [_split_part(i, j, part, images) for j, part in enumerate(content)]
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string or a list of parts, got {type(content).__name__}")
        out.append({**msg, "content": content})
    return out, images


def _split_part(i: int, j: int, part: Any, images: list) -> dict:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise ValueError(f"message {i} part {j}: a text part needs a string 'text'")
        return part
    if kind == "image":
        if part.get("image") is None:
            raise ValueError(f"message {i} part {j}: an image part needs an 'image' value")
        images.append(part["image"])
        return {"type": "image"}
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str) or not url:
            raise ValueError(f"message {i} part {j}: an image_url part needs image_url.url")
        images.append(url)
        return {"type": "image"}
    raise ValueError(f"message {i} part {j}: unsupported content part {part!r:.200}")


def render_chat(
    messages: list[dict], template: str | None = None, add_generation_prompt: bool = True, **kwargs: Any
) -> str:
    """Render already-split messages with `template` (ChatML when None)."""
    try:
        compiled = _compile(template or CHATML_TEMPLATE)
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template failed: {e}") from None


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """A template compiled once (compiling costs ~20 ms, rendering well under 1 ms); sandboxed environments
    are immutable, so sharing one compiled template across calls and threads is safe."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.filters["tojson"] = _tojson
    return env.from_string(template)


def _tojson(value: Any, indent: int | None = None, separators=None, sort_keys: bool = False,
            ensure_ascii: bool = False) -> str:
    """transformers' `tojson` for chat templates: plain json.dumps (jinja's own escapes <, > and & for HTML)."""
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)
