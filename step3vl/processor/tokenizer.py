"""Tokenizer from a checkpoint directory: tokenizer.json + tokenizer_config.json, fully offline."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from step3vl.processor.tokens import IM_PATCH, ImageTokenIds

THINK_END = "</think>"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON in {path}: {e}") from None


def _token_content(tok: object) -> str | None:
    # tokenizer_config.json stores special tokens either as strings or as AddedToken dicts.
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


class Step3VLTokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the ids the engine needs."""

    def __init__(self, tokenizer: Tokenizer, config: dict | None = None, extra_eos_ids: tuple[int, ...] = ()):
        self.tok = tokenizer
        self.config = config or {}
        self.chat_template: str | None = _chat_template(self.config)
        self.eos_token: str | None = _token_content(self.config.get("eos_token"))
        eos = [] if self.eos_token is None else [self.token_to_id(self.eos_token)]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos + list(extra_eos_ids)))
        self.image_ids = ImageTokenIds.from_vocab(self.token_to_id)
        self.think_end_id: int | None = self.tok.token_to_id(THINK_END)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Step3VLTokenizer":
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(f"tokenizer.json not found in {path}")
        try:
            tok = Tokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"cannot load {tj}: {e}") from None
        cfg_path = path / "tokenizer_config.json"
        config = _read_json(cfg_path) if cfg_path.is_file() else {}
        if "chat_template" not in config and (path / "chat_template.jinja").is_file():
            config["chat_template"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(tok, config, _generation_eos_ids(path))

    # -- vocabulary ----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def image_token_id(self) -> int:
        return self.image_ids.im_patch

    def token_to_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the tokenizer's vocabulary")
        return i

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    # -- text ----------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Special-token strings in `text` (e.g. `<|im_start|>`) map to their ids."""
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)


@dataclass
class StreamDecoder:
    """Incremental detokenizer for one sequence.

    Byte-level BPE can split one character over several tokens, and some decoders strip a leading
    space; so each step decodes a short window that starts at the last complete boundary, emits only
    the text past what that window already produced, and holds back while the text ends in an
    incomplete character (U+FFFD). The concatenation of all `step` outputs and `flush()` equals
    `decode(all_ids)` for byte-level tokenizers.
    """

    tokenizer: Step3VLTokenizer
    skip_special_tokens: bool = False
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0  # start of the window whose text was already emitted up to read_offset
    read_offset: int = 0  # ids before this have been turned into emitted text

    def step(self, new_ids: int | list[int]) -> str:
        self.ids.extend([new_ids] if isinstance(new_ids, int) else new_ids)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix) :]

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the very end)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :] if text.startswith(prefix) else ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, self.skip_special_tokens)


def _chat_template(config: dict) -> str | None:
    t = config.get("chat_template")
    if isinstance(t, list):  # transformers' named-template form: [{"name": ..., "template": ...}]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    return t if isinstance(t, str) and t else None


def _generation_eos_ids(path: Path) -> tuple[int, ...]:
    gc = path / "generation_config.json"
    if not gc.is_file():
        return ()
    eos = _read_json(gc).get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


__all__ = ["Step3VLTokenizer", "StreamDecoder", "THINK_END", "IM_PATCH"]
