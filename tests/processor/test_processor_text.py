"""Tiny tokenizer, tokenizer wrapper, chat template, placeholder expansion and the processor."""

import base64
import io
import json
import time

import pytest
from PIL import Image

from step3vl.processor import (
    CHATML_TEMPLATE,
    Step3VLProcessor,
    Step3VLTokenizer,
    image_token_ids,
    num_image_tokens,
    render_chat,
    split_images,
)
from step3vl.tools.tiny_tokenizer import write_tiny_tokenizer

SPECIALS = [
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<im_patch>",
    "<im_start>", "<im_end>", "<patch_start>", "<patch_end>", "<patch_newline>",
]
TEXTS = [
    "Hello world! The answer is \\boxed{42}.",
    "x^2 + 3x - 4 = 0, so x = 1 or x = -4.",
    "Unicode: 你好，世界 🙂🚀 naïve café — ok",
    "  leading spaces\n\nand\tnewlines\n",
    "<|im_start|>user\nWhat?<|im_end|>\n<think>hmm</think>The end.",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_tok")
    write_tiny_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Step3VLTokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def proc(tok_dir):
    return Step3VLProcessor.from_pretrained(tok_dir)


# ---- tiny tokenizer ---------------------------------------------------------------------------------


def test_write_tiny_tokenizer_files_and_ids(tmp_path):
    t0 = time.perf_counter()
    ids = write_tiny_tokenizer(tmp_path, vocab_size=1024)
    assert time.perf_counter() - t0 < 3.0
    assert set(ids) == set(SPECIALS)
    assert sorted(ids.values()) == list(range(1024 - len(SPECIALS), 1024))  # appended after the BPE vocab
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).is_file()
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>" and cfg["chat_template"] == CHATML_TEMPLATE
    assert {v["content"]: int(k) for k, v in cfg["added_tokens_decoder"].items()} == ids


def test_tiny_tokenizer_deterministic(tmp_path):
    write_tiny_tokenizer(tmp_path / "a", vocab_size=700)
    write_tiny_tokenizer(tmp_path / "b", vocab_size=700)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_tiny_tokenizer_too_small_vocab(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        write_tiny_tokenizer(tmp_path, vocab_size=100)


# ---- tokenizer wrapper --------------------------------------------------------------------------------


def test_ids_and_eos(tok):
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    assert tok.image_token_id == ids["<im_patch>"]
    assert tok.think_end_id == ids["</think>"]
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == ids["<|im_end|>"]
    assert tok.vocab_size == 1024
    with pytest.raises(KeyError, match="<nope>"):
        tok.token_to_id("<nope>")


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_are_single_ids(tok):
    for t in SPECIALS:
        assert tok.encode(t) == [tok.token_to_id(t)]
    assert tok.encode("a<im_patch>b").count(tok.image_token_id) == 1


def test_matches_transformers(tok_dir, tok):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(tok_dir))
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
    assert ref.eos_token_id == tok.eos_token_id


def test_skip_special_keeps_think(tok):
    ids = tok.encode("<|im_start|>assistant\n<think>a</think>b<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>a</think>b"


@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder_matches_full_decode(tok, text):
    ids = tok.encode(text)
    dec = tok.stream_decoder()
    pieces = [dec.step(i) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_holds_back_partial_characters(tok):
    ids = tok.encode("🙂")
    assert len(ids) > 1  # the tiny vocabulary splits the emoji into byte tokens
    dec = tok.stream_decoder()
    assert [dec.step(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert dec.step(ids[-1]) == "🙂"


def test_stream_decoder_flush_emits_incomplete_tail(tok):
    ids = tok.encode("ok🙂")
    dec = tok.stream_decoder()
    out = "".join(dec.step(i) for i in ids[:-1]) + dec.flush()
    assert out == tok.decode(ids[:-1])


def test_generation_config_eos_ids(tmp_path):
    write_tiny_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 6]}))
    t = Step3VLTokenizer.from_pretrained(tmp_path)
    assert t.eos_token_ids == (t.token_to_id("<|im_end|>"), 5, 6)


def test_missing_or_bad_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Step3VLTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Step3VLTokenizer.from_pretrained(tmp_path)


# ---- chat template ---------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image", "image": "IMG0"},
                                 {"type": "text", "text": " what is it?"}]},
    {"role": "assistant", "content": "A cat."},
    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "IMG1"}}, {"type": "text", "text": "And?"}]},
]
CHATML_EXPECTED = (
    "<|im_start|>system\nYou are helpful.<|im_end|>\n"
    "<|im_start|>user\nLook: <im_patch> what is it?<|im_end|>\n"
    "<|im_start|>assistant\nA cat.<|im_end|>\n"
    "<|im_start|>user\n<im_patch>And?<|im_end|>\n"
)


def test_split_images_in_order():
    plain, images = split_images(CONVERSATION)
    assert images == ["IMG0", "IMG1"]
    assert plain[1]["content"][1] == {"type": "image"} and plain[3]["content"][0] == {"type": "image"}
    assert CONVERSATION[1]["content"][1]["image"] == "IMG0"  # input not mutated


def test_chatml_fallback_rendering():
    plain, _ = split_images(CONVERSATION)
    assert render_chat(plain, None, add_generation_prompt=False) == CHATML_EXPECTED
    assert render_chat(plain, None, add_generation_prompt=True) == CHATML_EXPECTED + "<|im_start|>assistant\n"
    assert render_chat([{"role": "assistant", "content": None}], None, False) == "<|im_start|>assistant\n<|im_end|>\n"


def test_checkpoint_template_preferred(tmp_path):
    write_tiny_tokenizer(tmp_path)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = (
        "{% for m in messages %}[{{ m['role'] }}]{% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<im_patch>{% else %}{{ p['text'] }}"
        "{% endif %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    cfg_path.write_text(json.dumps(cfg))
    p = Step3VLProcessor.from_pretrained(tmp_path)
    text, images = p.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    assert text == "[system]You are helpful.[user]Look: <im_patch> what is it?[assistant]A cat.[user]<im_patch>And?[assistant]"
    assert images == ["IMG0", "IMG1"]


def test_chatml_used_without_checkpoint_template(tmp_path):
    write_tiny_tokenizer(tmp_path)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["chat_template"]
    cfg_path.write_text(json.dumps(cfg))
    p = Step3VLProcessor.from_pretrained(tmp_path)
    assert p.tokenizer.chat_template is None
    assert p.apply_chat_template(CONVERSATION, add_generation_prompt=False)[0] == CHATML_EXPECTED


@pytest.mark.parametrize(
    "messages,match",
    [
        ("hi", "list of dicts"),
        ([{"content": "x"}], "message 0"),
        ([{"role": "user", "content": 5}], "message 0: content"),
        ([{"role": "user", "content": [{"type": "audio"}]}], "message 0 part 0: unsupported"),
        ([{"role": "user", "content": [{"type": "image"}]}], "needs an 'image'"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "image_url.url"),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "string 'text'"),
    ],
)
def test_bad_messages(messages, match):
    with pytest.raises(ValueError, match=match):
        split_images(messages)


def test_template_errors_are_value_errors():
    with pytest.raises(ValueError, match="chat template failed.*boom"):
        render_chat([], "{{ raise_exception('boom') }}")


# ---- processor ---------------------------------------------------------------------------------------


def test_text_only(proc, tok):
    out = proc("Hello there")
    assert out.input_ids == tok.encode("Hello there") and out.images == [] and out.image_spans == []


def test_placeholder_expansion_in_chat(proc, tok):
    img = Image.new("RGB", (1280, 720), (1, 2, 3))
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Describe."}]}]
    out = proc(msgs)
    head, tail = "<|im_start|>user\n", "Describe.<|im_end|>\n<|im_start|>assistant\n"
    layout = image_token_ids((2, 3), tok.image_ids)
    assert out.input_ids == tok.encode(head) + layout + tok.encode(tail)
    assert out.image_spans == [(len(tok.encode(head)), len(tok.encode(head)) + 670)]
    assert out.num_image_tokens == 670 == num_image_tokens(1280, 720)
    assert out.input_ids.count(tok.image_token_id) == 6 * 81 + 169
    assert out.images[0].grid == (2, 3) and out.images[0].crops.shape == (6, 3, 504, 504)
    # The expanded ids equal tokenizing the full layout string.
    s, e = out.image_spans[0]
    assert tok.decode(out.input_ids[s:e]) == "".join(
        ["<patch_start>" + "<im_patch>" * 81 + "<patch_end>"] * 3 + ["<patch_newline>"]
        + ["<patch_start>" + "<im_patch>" * 81 + "<patch_end>"] * 3 + ["<im_start>" + "<im_patch>" * 169 + "<im_end>"]
    )


def test_two_images_from_paths_and_urls(proc, tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (728, 728), (5, 5, 5)).save(path)
    buf = io.BytesIO()
    Image.new("RGB", (300, 480), (9, 9, 9)).save(buf, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    msgs = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": path.as_uri()}},
        {"type": "text", "text": "vs"},
        {"type": "image_url", "image_url": {"url": data_url}},
    ]}]
    out = proc(msgs)
    assert [v.grid for v in out.images] == [(0, 0), (2, 1)]
    assert [e - s for s, e in out.image_spans] == [171, 338]
    assert out.image_spans[0][1] < out.image_spans[1][0]


def test_plain_text_with_images(proc, tok):
    img = Image.new("RGB", (64, 64))
    out = proc("A <im_patch> B", images=img)
    assert out.input_ids == tok.encode("A ") + image_token_ids((0, 0), tok.image_ids) + tok.encode(" B")


@pytest.mark.parametrize(
    "text,images,match",
    [
        ("no placeholder", [Image.new("RGB", (8, 8))], "0 image placeholder.*1 image"),
        ("<im_patch><im_patch>", [Image.new("RGB", (8, 8))], "2 image placeholder.*1 image"),
        ("<im_patch>", None, "1 image placeholder.*0 image"),
    ],
)
def test_placeholder_mismatch(proc, text, images, match):
    with pytest.raises(ValueError, match=match):
        proc(text, images=images)


def test_messages_plus_images_argument_rejected(proc):
    with pytest.raises(ValueError, match="inside the messages"):
        proc([{"role": "user", "content": "hi"}], images=[Image.new("RGB", (8, 8))])


def test_bad_image_in_messages(proc):
    with pytest.raises(ValueError, match="empty image data"):
        proc([{"role": "user", "content": [{"type": "image", "image": b""}]}])


def test_config_geometry_and_image_token_check(tmp_path):
    ids = write_tiny_tokenizer(tmp_path)
    cfg = {"image_token_id": ids["<im_patch>"], "understand_projector_stride": 2,
           "vision_config": {"patch_size": 28, "image_size": 728}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    p = Step3VLProcessor.from_pretrained(tmp_path)
    assert (p.layout.crop_tokens, p.layout.global_tokens) == (25, 49)  # 18→9→5, 26→13→7
    out = p("<im_patch>", images=Image.new("RGB", (1280, 720)))
    assert out.num_image_tokens == 6 * (25 + 2) + 1 + 49 + 2
    cfg["image_token_id"] = ids["<im_patch>"] + 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="image_token_id"):
        Step3VLProcessor.from_pretrained(tmp_path)


def test_config_can_turn_crops_off(tmp_path):
    """vision_config.use_crops=false (a small model's geometry): every picture is the global view alone, so an
    elongated one that STEP3-VL would cut into crops costs one view's tokens; a non-boolean value is refused."""
    ids = write_tiny_tokenizer(tmp_path)
    cfg = {"image_token_id": ids["<im_patch>"], "understand_projector_stride": 2,
           "vision_config": {"patch_size": 8, "image_size": 128, "use_crops": False}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    p = Step3VLProcessor.from_pretrained(tmp_path)
    assert p.spec.crops is False and p.layout.global_tokens == 16  # 16 patches a side → 8 → 4
    for size in ((512, 224), (1280, 720), (300, 300)):
        out = p("<im_patch>", images=Image.new("RGB", size))
        assert out.num_image_tokens == 16 + 2 and out.images[0].num_crops == 0
        assert tuple(out.images[0].global_view.shape) == (3, 128, 128)
    cfg["vision_config"]["use_crops"] = True  # the official behaviour: a 512x224 picture gets 224 px crops
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert Step3VLProcessor.from_pretrained(tmp_path)("<im_patch>", images=Image.new("RGB", (512, 224))).images[0].num_crops == 3
    cfg["vision_config"]["use_crops"] = "no"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_crops"):
        Step3VLProcessor.from_pretrained(tmp_path)
