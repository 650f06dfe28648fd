"""A problem (an id plus OpenAI-style chat messages) and its checked, image-loaded form."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from step3vl.processor import load_image

from step3vl_pacore.template import last_user_index, user_text


@dataclass
class Problem:
    id: str
    messages: list[dict]
    ground_truth: Any = None
    category: Any = None

    @classmethod
    def from_record(cls, record: dict, default_id: str) -> "Problem":
        """The official input format: {"id", "messages", optional "ground_truth", "category"}."""
        if not isinstance(record, dict):
            raise ValueError(f"a problem record must be a JSON object, got {type(record).__name__}")
        pid = record.get("id", default_id)
        return cls(id=str(pid), messages=record.get("messages"), ground_truth=record.get("ground_truth"),
                   category=record.get("category"))

    @classmethod
    def from_question(cls, question: str, image: Any = None, id: str = "0", system: str | None = None) -> "Problem":
        content: Any = question
        if image is not None:
            content = [{"type": "image", "image": image}, {"type": "text", "text": question}]
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        return cls(id=id, messages=messages)


@dataclass
class PreparedProblem:
    messages: list[dict]  # images loaded (PIL), image_url parts turned into image parts
    original_prompt: str  # the text of the last user turn
    num_images: int = 0


def prepare(problem: Problem) -> PreparedProblem:
    """Check the conversation and load its images once; raises ValueError naming what is wrong."""
    msgs = problem.messages
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("empty problem: 'messages' must be a non-empty list of chat messages")
    out, n_images = [], 0
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"message {i} must be an object with a 'role', got {m!r:.200}")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                loaded = _load_part(i, j, part)
                n_images += loaded.get("type") == "image"
                parts.append(loaded)
            content = parts
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string or a list of parts, got {type(content).__name__}")
        out.append({**m, "content": content})
    i = last_user_index(out)
    text = user_text(out[i]["content"])
    has_image = isinstance(out[i]["content"], list) and any(p.get("type") == "image" for p in out[i]["content"])
    if not text.strip() and not has_image:
        raise ValueError(f"empty problem: the last user turn (message {i}) has neither text nor an image")
    return PreparedProblem(out, text, n_images)


def _load_part(i: int, j: int, part: Any) -> dict:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise ValueError(f"message {i} part {j}: a text part needs a string 'text'")
        return part
    if kind in ("image", "image_url"):
        src = part.get("image") if kind == "image" else part.get("image_url")
        src = src.get("url") if isinstance(src, dict) else src
        if src is None:
            raise ValueError(f"message {i} part {j}: an {kind} part needs an image source")
        try:
            img = load_image(src)
        except ValueError as e:
            raise ValueError(f"message {i} part {j}: unreadable image: {e}") from None
        return {"type": "image", "image": img}
    raise ValueError(f"message {i} part {j}: unsupported content part {part!r:.200}")
