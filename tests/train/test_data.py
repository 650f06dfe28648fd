"""Training data: records → token ids with loss labels → packed batches, checked against the processor's own
whole-conversation tokenisation and against hand-built expectations."""

from __future__ import annotations

import json

import pytest
import torch

from step3vl.train.data import (IGNORE, TrainExample, chat_example, example_from_record, load_examples, pack,
                                text_example, token_budget_batches)


def _runs(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of target positions."""
    runs, start = [], None
    for i, t in enumerate(labels + [IGNORE]):
        if t != IGNORE and start is None:
            start = i
        elif t == IGNORE and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _chat(make_image):
    return [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image", "image": make_image(60, 40, seed=1)},
                                     {"type": "text", "text": "what is it?"}]},
        {"role": "assistant", "content": "A red box."},
        {"role": "user", "content": [{"type": "text", "text": "and this one"},
                                     {"type": "image", "image": make_image(40, 60, seed=2)}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Still "}, {"type": "text", "text": "red!"}]},
    ]


# -- chat examples ---------------------------------------------------------------------------------------

def test_chat_tokens_equal_the_processors_whole_conversation(processor, make_image):
    msgs = _chat(make_image)
    ex = chat_example(processor, msgs)
    ref = processor(msgs, add_generation_prompt=False)
    # The per-segment tokenisation must not drift from the one the whole rendered conversation gets.
    assert ex.input_ids == ref.input_ids
    assert ex.image_positions == ref.image_positions
    # ... which are every `<im_patch>` of the layout the processor expanded each image to, nothing else.
    in_spans = [i for s, e in ref.image_spans for i in range(s, e)]
    assert ex.image_positions == [i for i in in_spans if ref.input_ids[i] == processor.image_token_id]
    assert len(ex.image_positions) == 2 * processor.layout.global_tokens  # no crops at these sizes
    assert len(ex.labels) == len(ex.input_ids)
    # The images in conversation order (the second is portrait: its global view is the only distinction
    # we can check without pixels, so compare the views to the processor's).
    assert [im.size for im in ex.images] == [(60, 40), (40, 60)]
    for a, b in zip(ex.images, ref.images):
        assert torch.equal(a.global_view, b.global_view) and a.grid == b.grid


def test_chat_targets_are_exactly_each_assistant_turn_and_its_end(processor, make_image):
    msgs = _chat(make_image)
    ex = chat_example(processor, msgs)
    tok = processor.tokenizer
    for t, lab in zip(ex.input_ids, ex.labels):
        assert lab in (IGNORE, t)
    runs = _runs(ex.labels)
    assert [tok.decode(ex.input_ids[s:e]) for s, e in runs] == ["A red box.<|im_end|>", "Still red!<|im_end|>"]
    for s, _ in runs:  # the role header is context, right before the target run
        assert tok.decode(ex.input_ids[:s]).endswith("<|im_start|>assistant\n")
    # Independent count: each turn's content tokens plus its end-of-turn token, nothing else.
    im_end = tok.token_to_id("<|im_end|>")
    expected = [tok.encode("A red box.") + [im_end], tok.encode("Still red!") + [im_end]]
    assert [ex.input_ids[s:e] for s, e in runs] == expected
    assert ex.num_targets == sum(map(len, expected))
    # The system prompt, user turns and the trailing newline are context only.
    context = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab == IGNORE])
    assert "be brief" in context and "what is it?" in context and "and this one" in context
    assert tok.decode(ex.input_ids[runs[-1][1]:]) == "\n"  # after the last end-of-turn: formatting only


def test_chat_image_tokens_are_never_targets(processor, make_image):
    msgs = _chat(make_image)
    ex = chat_example(processor, msgs)
    spans = processor(msgs, add_generation_prompt=False).image_spans
    image_ids = set(vars(processor.tokenizer.image_ids).values())
    assert len(spans) == 2
    for s, e in spans:  # the whole layout: patches and its markers
        assert set(ex.input_ids[s:e]) <= image_ids
        assert all(lab == IGNORE for lab in ex.labels[s:e])
    assert not image_ids & {t for t in ex.labels if t != IGNORE}


def test_image_in_an_assistant_turn_is_not_a_target(processor, make_image):
    msgs = [{"role": "user", "content": "draw"},
            {"role": "assistant", "content": [{"type": "text", "text": "here:"},
                                              {"type": "image", "image": make_image()}]}]
    ex = chat_example(processor, msgs)
    ref = processor(msgs, add_generation_prompt=False)
    assert ex.input_ids == ref.input_ids and ex.image_positions == ref.image_positions
    (s, e), = ref.image_spans
    runs = _runs(ex.labels)
    assert [processor.tokenizer.decode(ex.input_ids[a:b]) for a, b in runs] == ["here:", "<|im_end|>"]
    assert runs[0][1] == s and runs[1][0] == e


# -- text examples ---------------------------------------------------------------------------------------

def test_text_example_without_images_targets_every_token(processor):
    ex = text_example(processor, "The quick brown fox.")
    assert ex.input_ids == processor.tokenizer.encode("The quick brown fox.")
    assert ex.labels == ex.input_ids
    assert ex.num_targets == len(ex) - 1  # the first token has no context to be predicted from
    assert ex.images == [] and ex.image_positions == []


def test_text_example_with_a_placeholder(processor, make_image):
    text = "before <im_patch> after"
    ex = text_example(processor, text, [make_image()])
    ref = processor.process(text, [make_image()])
    assert ex.input_ids == ref.input_ids and ex.image_positions == ref.image_positions
    (s, e), = ref.image_spans
    assert 0 < s < e < len(ex)
    assert ex.labels == [IGNORE if s <= i < e else t for i, t in enumerate(ex.input_ids)]


def test_text_example_without_a_placeholder_puts_the_images_first(processor, make_image):
    imgs = [make_image(seed=3), make_image(40, 60, seed=4)]
    ex = text_example(processor, "two pictures", imgs)
    ref = processor.process("<im_patch><im_patch>two pictures", imgs)
    assert ex.input_ids == ref.input_ids and ex.image_positions == ref.image_positions
    assert ref.image_spans[0][0] == 0 and ref.image_spans[0][1] == ref.image_spans[1][0]
    end = ref.image_spans[1][1]
    assert all(lab == IGNORE for lab in ex.labels[:end])
    assert ex.labels[end:] == processor.tokenizer.encode("two pictures")


def test_text_example_placeholder_count_must_match(processor, make_image):
    with pytest.raises(ValueError, match="placeholder"):
        text_example(processor, "<im_patch> and <im_patch>", [make_image()])


# -- records and files -----------------------------------------------------------------------------------

def test_records_dispatch_on_their_key(processor, make_image, tmp_path):
    img_path = tmp_path / "a.png"
    make_image().save(img_path)
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert example_from_record(processor, chat).input_ids == chat_example(processor, chat["messages"]).input_ids
    rec = {"text": "a caption", "image": str(img_path)}
    ex = example_from_record(processor, rec)
    assert ex.input_ids == processor.process("<im_patch>a caption", [str(img_path)]).input_ids


def test_load_examples_reads_every_record(processor, tmp_path):
    f = tmp_path / "data.jsonl"
    lines = [{"text": "one"}, {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    f.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    exs = load_examples(processor, f)
    assert [e.input_ids for e in exs] == [text_example(processor, "one").input_ids,
                                          chat_example(processor, lines[1]["messages"]).input_ids]


def test_bad_json_line_names_file_and_line(processor, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(ValueError, match=rf"{f.name}:3: invalid JSON"):
        load_examples(processor, f)


def test_invalid_utf8_names_file_and_line(processor, tmp_path):
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(ValueError, match=rf"{f.name}:2: invalid UTF-8 at byte 13 of the line"):
        load_examples(processor, f)


def test_record_with_neither_key_names_file_and_line(processor, tmp_path):
    f = tmp_path / "nokey.jsonl"
    f.write_text('{"text": "ok"}\n{"caption": "no"}\n')
    with pytest.raises(ValueError, match=rf"{f.name}:2: a record needs 'messages' \(chat\) or 'text'"):
        load_examples(processor, f)


def test_record_error_line_counts_blank_lines(processor, tmp_path):
    """The location of a bad record is its line in the file, as for invalid JSON (blank lines count)."""
    f = tmp_path / "gap.jsonl"
    f.write_text('{"text": "ok"}\n\n{"caption": "no"}\n')
    with pytest.raises(ValueError, match=rf"{f.name}:3:"):
        load_examples(processor, f)


def test_chat_without_an_assistant_turn_is_rejected(processor):
    with pytest.raises(ValueError, match="r1: .*assistant"):
        example_from_record(processor, {"messages": [{"role": "user", "content": "hi"}]}, where="r1")


def test_non_object_record_is_rejected(processor):
    with pytest.raises(ValueError, match="r2: expected a JSON object"):
        example_from_record(processor, ["text"], where="r2")


def test_train_example_checks_label_length():
    with pytest.raises(ValueError, match="labels"):
        TrainExample([1, 2, 3], [1, 2])


# -- packing ---------------------------------------------------------------------------------------------

def test_pack_positions_and_targets_stay_within_each_example(processor, make_image):
    exs = [text_example(processor, "first example here"),
           chat_example(processor, [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "an answer"}]),
           text_example(processor, "x", [make_image()])]
    b = pack(exs)
    # Independent reference, example by example.
    ids, pos, tgt = [], [], []
    for ex in exs:
        n = len(ex)
        ids += ex.input_ids
        pos += list(range(n))
        tgt += [ex.labels[t + 1] if t + 1 < n else IGNORE for t in range(n)]
    assert b.input_ids.tolist() == ids and b.positions.tolist() == pos and b.targets.tolist() == tgt
    assert b.input_ids.dtype == b.positions.dtype == b.targets.dtype == torch.long
    assert b.seq_lens == [len(ex) for ex in exs]
    ends = torch.tensor(b.seq_lens).cumsum(0) - 1
    assert (b.targets[ends] == IGNORE).all()  # no example predicts the next one's first token
    assert (b.positions[ends + 1 - torch.tensor(b.seq_lens)] == 0).all()
    assert b.num_targets == sum(ex.num_targets for ex in exs)
    assert len(b.images) == 1 and b.images[0] is exs[2].images[0]


def test_pack_image_mask_is_the_feature_positions(processor, make_image):
    """image_mask marks the positions the image features fill: the `<im_patch>` rows of each image's layout
    (as many as the encoder yields for it), in the right example, never a marker token."""
    inputs = [("no image", []), ("cap <im_patch> tail", [make_image()]),
              ("two", [make_image(seed=5), make_image(40, 60, seed=6)])]
    exs = [text_example(processor, text, imgs) for text, imgs in inputs]
    b = pack(exs)
    expected = torch.zeros(len(b.input_ids), dtype=torch.bool)
    off = 0
    for (text, imgs), ex in zip(inputs, exs):  # independently: the `<im_patch>` ids inside the processor's spans
        if imgs and "<im_patch>" not in text:
            text = "<im_patch>" * len(imgs) + text
        for s, e in processor.process(text, imgs).image_spans:
            expected[off + s:off + e] = torch.tensor(ex.input_ids[s:e]) == processor.image_token_id
        off += len(ex)
    n_features = sum(v.num_crops * processor.layout.crop_tokens + processor.layout.global_tokens for v in b.images)
    assert int(expected.sum()) == n_features == 3 * processor.layout.global_tokens
    assert torch.equal(b.image_mask, expected)


def test_pack_rejects_nothing():
    with pytest.raises(ValueError, match="no examples"):
        pack([])


# -- token-budget batches --------------------------------------------------------------------------------

def test_token_budget_batches_greedy_groups():
    assert list(token_budget_batches([3, 4, 2, 5, 1], 7, key=lambda n: n)) == [[3, 4], [2, 5], [1]]
    assert list(token_budget_batches([7, 7], 7, key=lambda n: n)) == [[7], [7]]  # an exact fit stays alone
    assert list(token_budget_batches([], 7)) == []
    exs = [TrainExample([1] * n, [1] * n) for n in (2, 3, 4)]
    assert [[len(e) for e in g] for g in token_budget_batches(exs, 5)] == [[2, 3], [4]]


def test_token_budget_names_the_example_over_the_limit():
    with pytest.raises(ValueError, match=r"example 2 has 9 tokens.*max_tokens=8"):
        list(token_budget_batches([1, 2, 9], 8, key=lambda n: n))
