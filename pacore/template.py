"""The synthesis prompt: the official template verbatim, and how it replaces the last user turn.

Rendered with a plain `jinja2.Template`, as the official client does (so its defaults apply: no
trim_blocks, and the template's single trailing newline is dropped).

Vision adaptation (the official client replaces the whole content with a string, which would drop the
image): in a user turn made of content parts, the image parts stay where they are, the synthesis text
takes the place of the first text part and the other text parts go; with no text part it follows the
images. `original_prompt` is the text of that turn (its text parts joined by newlines).
"""

from __future__ import annotations

import jinja2

SYNTHESIS_TEMPLATE = """\
You are given a problem and a list of reference responses. Your job is to analyze these references and provide your own response.

Original Problem:
{{ original_prompt }}

Reference Responses:
{% for response in ref_responses %}
Reference {{ loop.index }}:
{{ response }}
{% endfor %}

Now, based on the original problem and reference responses above, please provide your own comprehensive solution.
"""

_TEMPLATE = jinja2.Template(SYNTHESIS_TEMPLATE)


def render_synthesis(original_prompt: str, ref_responses: list[str]) -> str:
    return _TEMPLATE.render(original_prompt=original_prompt, ref_responses=ref_responses)


def last_user_index(messages: list[dict]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if isinstance(messages[i], dict) and messages[i].get("role") == "user":
            return i
    raise ValueError("the conversation has no user turn")


def user_text(content) -> str:
    """The text of a user turn: the string itself, or its text parts joined by newlines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text")


def replace_user_text(content, text: str):
    """`content` with its text replaced by `text`, image parts kept in place."""
    if content is None or isinstance(content, str):
        return text
    out, placed = [], False
    for part in content:
        if isinstance(part, dict) and part.get("type") == "text":
            if not placed:
                out.append({"type": "text", "text": text})
                placed = True
            continue
        out.append(part)
    if not placed:
        out.append({"type": "text", "text": text})
    return out


def synthesis_messages(messages: list[dict], ref_responses: list[str], original_prompt: str | None = None) -> list[dict]:
    """The conversation of a round after the first: the last user turn's text becomes the synthesis prompt."""
    i = last_user_index(messages)
    if original_prompt is None:
        original_prompt = user_text(messages[i].get("content"))
    out = list(messages)
    turn = {k: v for k, v in messages[i].items() if k != "content"}
    content = messages[i].get("content")
    turn["content"] = replace_user_text(content, render_synthesis(original_prompt, ref_responses))
    out[i] = turn
    return out
