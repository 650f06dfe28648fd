"""Training examples: records → token ids with loss labels → packed batches (no padding).

Two kinds of record (one JSON object per line of a JSONL file):
- {"messages": [...]}: a chat (OpenAI-style, images as content parts); the loss is on the assistant turns only
  (their content and the template's end-of-turn tokens), as in supervised fine-tuning;
- {"text": "...", "images": [...]}: image-text pre-training; the text holds one `<image>` placeholder per image
  (or none: the images then come first); the loss is on every text token, never on image tokens.

Labels follow transformers' convention: `labels[t]` is `input_ids[t]` where that token is a target and IGNORE
elsewhere; `pack` shifts them within each sequence, so no sequence predicts the next one's first token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch

from step3vl.model.attention import AttentionBackend, DenseAttention, SharedPrefixAttention
from step3vl.processor import Step3VLProcessor
from step3vl.processor.chat import split_images
from step3vl.processor.image import ImageViews, LazyImageViews
from step3vl.processor.tokens import IMAGE_PLACEHOLDER

IGNORE = -100
T = TypeVar("T")


@dataclass
class TrainExample:
    input_ids: list[int]
    labels: list[int]  # input_ids where the token is a target, IGNORE elsewhere
    images: list[ImageViews | LazyImageViews] = field(default_factory=list)
    image_positions: list[int] = field(default_factory=list)  # the `<im_patch>` slots the images' features fill

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.input_ids):
            raise ValueError(f"labels ({len(self.labels)}) and input_ids ({len(self.input_ids)}) differ in length")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        return sum(t != IGNORE for t in self.labels[1:])


@dataclass
class PackedBatch:
    """Several examples as one packed sequence of T tokens (the model's input format)."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, restarting at 0 for each example
    targets: torch.Tensor  # [T] int64: the token each position predicts, or IGNORE
    seq_lens: list[int]
    images: list[ImageViews]
    image_mask: torch.Tensor  # [T] bool: the positions the images' features fill
    # (prefix_len, [branch_len, ...]) per group when branches share their group's prefix (pack_groups);
    # None: independent sequences of seq_lens (pack).
    prefix_groups: list[tuple[int, list[int]]] | None = None

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE).sum())

    def attention(self) -> AttentionBackend:
        if self.prefix_groups is not None:
            return SharedPrefixAttention(self.prefix_groups)
        return DenseAttention(self.seq_lens)


@dataclass
class SampleGroup:
    """Responses sampled from one prompt: trained as branches of the prompt, which is computed once."""

    prompt: TrainExample  # ids, images and image slots of the prompt (its labels are not used: no loss on it)
    responses: list[list[int]]  # each a sampled continuation; every token is a target

    def __post_init__(self) -> None:
        if len(self.prompt) < 1:
            raise ValueError("SampleGroup: empty prompt")
        if self.prompt.image_positions and max(self.prompt.image_positions) >= len(self.prompt) - 1:
            raise ValueError("SampleGroup: the prompt's last token is an image slot (it starts every branch)")

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) - 1 + sum(1 + len(r) for r in self.responses)


def _pieces(processor: Step3VLProcessor, text: str, images: list[Any], is_target: bool, ex: TrainExample,
            lazy: bool) -> None:
    p = processor.process(text, images, lazy=lazy)
    base = len(ex.input_ids)
    ex.input_ids += p.input_ids
    in_image = {i for s, e in p.image_spans for i in range(s, e)}  # patches and the layout's markers
    ex.labels += [t if is_target and i not in in_image else IGNORE for i, t in enumerate(p.input_ids)]
    ex.images += p.images
    ex.image_positions += [base + i for i in p.image_positions]



def chat_example(processor: Step3VLProcessor, messages: list[dict], lazy: bool = False) -> TrainExample:
    """Loss on each assistant turn: the text the template adds for that turn beyond the conversation before
    it plus the generation prompt (so the role header is context, the content and end-of-turn are targets).

    The context and the reply are tokenised separately, as at inference (the prompt is tokenised alone, the
    model then writes the reply's tokens), so a BPE merge across the header/reply boundary never appears in
    training data; the ids may therefore differ from tokenising the whole rendered chat at once."""
    plain, sources = split_images(messages)
    if not any(m.get("role") == "assistant" for m in plain):
        raise ValueError("a chat example needs at least one assistant turn to learn from")
    ex = TrainExample([], [])
    done, used = "", 0  # rendered text consumed so far, images consumed so far
    for i, msg in enumerate(plain):
        if msg.get("role") != "assistant":
            continue
        context = processor.render_split(plain[:i], add_generation_prompt=True)
        turn = processor.render_split(plain[:i + 1], add_generation_prompt=False)
        if not context.startswith(done) or not turn.startswith(context):
            raise ValueError(f"message {i}: the chat template does not render the conversation incrementally, "
                             f"so the assistant tokens cannot be located")
        used = _add_span(processor, context[len(done):], sources, used, False, ex, lazy)
        reply = turn[len(context):]
        body = reply.rstrip("\n")  # the newline after the end-of-turn token is formatting, not something to learn
        used = _add_span(processor, body, sources, used, True, ex, lazy)
        done = context + body
    full = processor.render_split(plain, add_generation_prompt=False)
    _add_span(processor, full[len(done):], sources, used, False, ex, lazy)
    return ex


def _add_span(processor: Step3VLProcessor, text: str, sources: list[Any], used: int, is_target: bool,
              ex: TrainExample, lazy: bool) -> int:
    n = text.count(IMAGE_PLACEHOLDER)
    if text:
        _pieces(processor, text, sources[used:used + n], is_target, ex, lazy)
    return used + n


def text_example(processor: Step3VLProcessor, text: str, images: list[Any] | None = None,
                 lazy: bool = False) -> TrainExample:
    """Image-text pre-training: every text token is a target, image tokens never are."""
    images = list(images or [])
    if images and IMAGE_PLACEHOLDER not in text:
        text = IMAGE_PLACEHOLDER * len(images) + text
    ex = TrainExample([], [])
    _pieces(processor, text, images, True, ex, lazy)
    return ex


def example_from_record(processor: Step3VLProcessor, record: dict, where: str = "record",
                        lazy: bool = False) -> TrainExample:
    try:
        if not isinstance(record, dict):
            raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        if "messages" in record:
            return chat_example(processor, record["messages"], lazy)
        if "text" in record:
            images = record.get("images") or ([record["image"]] if record.get("image") is not None else [])
            return text_example(processor, record["text"], images, lazy)
        raise ValueError("a record needs 'messages' (chat) or 'text' (image-text)")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line; a bad line raises naming file:line."""
    path = Path(path)
    with open(path, "rb") as f:  # decoded line by line, so a bad byte is reported with its line
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid UTF-8 at byte {e.start} of the line") from None
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e})") from None


def load_examples(processor: Step3VLProcessor, path: str | Path, lazy_images: bool = True) -> list[TrainExample]:
    """Every record of a JSONL file; with lazy_images, images are planned from their headers now (token layout,
    errors for missing or unreadable files) and preprocessed only when a training step encodes them."""
    return [example_from_record(processor, r, f"{path}:{n}", lazy_images) for n, r in read_jsonl(path)]


def split_long(example: TrainExample, max_len: int, where: str = "example") -> list[TrainExample]:
    """A text example longer than max_len as consecutive windows of at most max_len tokens (each trained as its
    own sequence: pre-training on documents longer than the context); one holding images cannot be cut."""
    if len(example) <= max_len:
        return [example]
    if example.images:
        raise ValueError(f"{where}: {len(example)} tokens with images exceed max_seq_len={max_len} (an example with "
                         f"images is never split)")
    return [TrainExample(example.input_ids[s:s + max_len], example.labels[s:s + max_len])
            for s in range(0, len(example), max_len)]


def pack(examples: list[TrainExample]) -> PackedBatch:
    if not examples:
        raise ValueError("pack: no examples")
    ids, pos, tgt, images = [], [], [], []
    mask = torch.zeros(sum(len(ex) for ex in examples), dtype=torch.bool)
    for ex in examples:
        mask[[len(ids) + i for i in ex.image_positions]] = True
        ids += ex.input_ids
        pos += range(len(ex))
        tgt += ex.labels[1:] + [IGNORE]  # position t predicts token t+1 of the same example
        images += ex.images
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return PackedBatch(as_long(ids), as_long(pos), as_long(tgt), [len(ex) for ex in examples], images, mask)


def pack_groups(groups: list[SampleGroup]) -> PackedBatch:
    """Each group as its prompt minus the last token (the shared prefix) followed by one branch per response:
    [last prompt token, response...], so the branch's first position predicts the response's first token from
    the same context as the prompt's end would; positions continue the prefix's."""
    if not groups:
        raise ValueError("pack_groups: no groups")
    ids, pos, tgt, images, layout = [], [], [], [], []
    slots: list[int] = []
    for g in groups:
        prefix = g.prompt.input_ids[:-1]
        slots += [len(ids) + i for i in g.prompt.image_positions]
        ids += prefix
        pos += range(len(prefix))
        tgt += [IGNORE] * len(prefix)
        images += g.prompt.images
        for r in g.responses:
            ids += [g.prompt.input_ids[-1]] + list(r)
            pos += range(len(prefix), len(prefix) + 1 + len(r))
            tgt += list(r) + [IGNORE]
        layout.append((len(prefix), [1 + len(r) for r in g.responses]))
    mask = torch.zeros(len(ids), dtype=torch.bool)
    mask[slots] = True
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return PackedBatch(as_long(ids), as_long(pos), as_long(tgt), [p + sum(b) for p, b in layout], images, mask,
                       prefix_groups=layout)


def token_budget_batches(items: Iterable[T], max_tokens: int, key: Callable[[T], int] = len) -> Iterator[list[T]]:
    """Consecutive items grouped greedily so each group's total length (`key`) stays within max_tokens."""
    group: list[T] = []
    size = 0
    for i, item in enumerate(items):
        n = key(item)
        if n > max_tokens:
            raise ValueError(f"example {i} has {n} tokens, over the batch limit max_tokens={max_tokens}")
        if group and size + n > max_tokens:
            yield group
            group, size = [], 0
        group.append(item)
        size += n
    if group:
        yield group
