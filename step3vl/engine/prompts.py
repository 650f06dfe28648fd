"""Prompt preparation: what a caller passes (a string, token ids, a vLLM-style prompt dict, chat messages) with its
images -> a `PreparedPrompt`, the tokenized form the engine takes.

Preparing reads only the processor and the vocabulary size, never engine state: a server prepares on worker
threads (images are decoded and preprocessed there) while the engine thread keeps stepping.
"""

from __future__ import annotations

import hashlib
import itertools
import operator
from dataclasses import dataclass, field
from typing import Any

from step3vl.engine.image_inputs import image_hash
from step3vl.processor import Step3VLProcessor


@dataclass(slots=True)
class PreparedPrompt:
    """A prompt tokenized and its images preprocessed (`LLM.prepare`): what the engine takes. Preparing touches
    no engine state, so a server can prepare on worker threads while the engine thread keeps stepping."""
    prompt: str | None
    token_ids: list[int]
    images: list = field(default_factory=list)
    salt: int = 0  # prefix-cache salt: cache_salt
    image_hashes: list[int] = field(default_factory=list)  # per image, its pixels' digest (the prefix cache's key)


def prompt_list(prompts: Any) -> list:
    """One prompt (a string, a dict, a list of token ids) or a list of them -> a list of prompts."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        return [prompts]
    return list(prompts)


def token_ids(ids: Any, what: str = "prompt_token_ids") -> list[int]:
    """Token ids as plain ints, checked here so nothing else (the scheduler, the native block manager) ever sees
    another type: ints and integer numpy scalars are taken; bools, floats and strings are refused, naming the
    position."""
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"{what}: expected a list of token ids, got {type(ids).__name__}")
    out = []
    for i, t in enumerate(ids):
        if not _is_int(t):
            raise ValueError(f"{what}[{i}] = {t!r} ({type(t).__name__}): token ids must be integers")
        out.append(operator.index(t))
    return out


def _is_int(t: Any) -> bool:
    # bool is an int subclass, and True would silently be token 1; numpy integers have __index__, floats do not
    return not isinstance(t, bool) and hasattr(type(t), "__index__")


def cache_salt(cache_salt: str) -> int:
    """A prompt dict's `cache_salt` (vLLM's) -> the prefix cache's salt: equal salts share cached blocks."""
    return int.from_bytes(hashlib.blake2b(cache_salt.encode(), digest_size=8).digest(), "little") & (2**63 - 1)


class PromptPreparer:
    """Prompts -> `PreparedPrompt`s with one processor and vocabulary (thread-safe: no mutable state)."""

    def __init__(self, processor: Step3VLProcessor, vocab_size: int, share_prefixes: bool = True):
        self.processor = processor
        self.vocab_size = vocab_size
        # Off (enable_prefix_caching=False): each prepared prompt gets a salt of its own, so no two requests share
        # cached blocks; a request's n samples still fork from its one prefill.
        self._own_salts = None if share_prefixes else itertools.count(1)

    def prepare(self, prompt: Any) -> PreparedPrompt:
        """Tokenize a prompt and preprocess its images; a PreparedPrompt passes through. Raises ValueError naming
        the problem: bad prompt type, image, placeholder count or token id."""
        if isinstance(prompt, PreparedPrompt):
            return prompt
        text, ids, images = self._process(prompt)
        self._check_ids(ids)
        salt = 0
        if isinstance(prompt, dict) and prompt.get("cache_salt") is not None:
            salt = cache_salt(str(prompt["cache_salt"]))
        if self._own_salts is not None:
            salt = (1 << 62) | next(self._own_salts)
        return PreparedPrompt(text, ids, images, salt, [image_hash(im) for im in images])

    def chat(self, messages: list[dict] | list[list[dict]], add_generation_prompt: bool = True) -> list[dict]:
        """One conversation (a list of messages) or a list of them -> one {"prompt", "images"} dict each: the
        chat template rendered with one placeholder per image, the images in order (`LLM.chat`)."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = []
        for conv in conversations:
            text, images = self.processor.apply_chat_template(conv, add_generation_prompt=add_generation_prompt)
            prompts.append({"prompt": text, "images": images})
        return prompts

    def _process(self, prompt: Any) -> tuple[str | None, list[int], list]:
        """A prompt: str, list of token ids, or {"prompt" | "prompt_token_ids": ..., "images": [...],
        "cache_salt": str} (vLLM's name: requests with different salts never share cached blocks)."""
        if isinstance(prompt, str):
            p = self.processor.process(prompt, [])
            return prompt, p.input_ids, []
        if isinstance(prompt, (list, tuple)) and all(_is_int(t) for t in prompt):
            return None, token_ids(prompt), []
        if isinstance(prompt, dict):
            images = prompt.get("images") or ([prompt["image"]] if "image" in prompt else [])
            if not isinstance(images, (list, tuple)):
                raise ValueError(f"prompt 'images': expected a list, got {type(images).__name__}")
            if "prompt_token_ids" in prompt:
                if images:
                    raise ValueError("images with prompt_token_ids: pass the prompt text so the image tokens "
                                     "can be laid out")
                return None, token_ids(prompt["prompt_token_ids"]), []
            if "prompt" in prompt:
                if not isinstance(prompt["prompt"], str):
                    raise ValueError(f"prompt 'prompt': expected a string, got {type(prompt['prompt']).__name__}")
                p = self.processor.process(prompt["prompt"], list(images))
                return prompt["prompt"], p.input_ids, p.images
        raise ValueError(f"unsupported prompt of type {type(prompt).__name__}: use a string, a list of token ids "
                         f"or a dict with 'prompt' or 'prompt_token_ids' (and optional 'images')")

    def _check_ids(self, ids: list[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
