"""The shipped demo model (step3vl/assets/shapes_demo): small, in the official format, and it still answers held-out
shapes problems as it did when measured (a broken loader, processor, tokenizer or engine path fails this)."""

import json

import torch

from step3vl import LLM, SamplingParams
from step3vl.cli import SHAPES_MODEL, main
from step3vl.config import Step3VLConfig
from step3vl.loader import load_model
from step3vl.processor import Step3VLProcessor
from step3vl.tasks.shapes import COLOURS, final_answer, generate

# Greedy accuracy on seeds 0-69 (10 per question type) measured on the shipped model: see its README.md.
# The bound sits below the measured figure by more than sampling noise could explain for a working model.
HELD_OUT_SLICE = range(70)
MEASURED_GREEDY = 50 / 70  # 2026-12-07, this CPU (greedy decoding is deterministic; kernels may differ elsewhere)
BOUND = 0.60  # a broken image path leaves the model guessing (the untrained-perception floor is ~20%)


def test_shipped_checkpoint_is_small_bf16_and_official_format():
    files = sorted(p.name for p in SHAPES_MODEL.iterdir())
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "README.md", "model.safetensors.index.json"):
        assert name in files
    size = sum(p.stat().st_size for p in SHAPES_MODEL.glob("*.safetensors"))
    assert size <= 50 * 2**20
    cfg = Step3VLConfig.from_pretrained(SHAPES_MODEL)
    assert cfg.model_type == "step_robotics" and cfg.has_vision and cfg.vision.use_rope2d
    model = load_model(SHAPES_MODEL, dtype=torch.float32)
    assert {p.dtype for p in load_model(SHAPES_MODEL).parameters()} == {torch.bfloat16}
    assert any(k.startswith("vision_model.vit_downsampler2") for k in model.state_dict())
    proc = Step3VLProcessor.from_pretrained(SHAPES_MODEL)
    assert proc.tokenizer.think_end_id is not None and proc.spec.global_size == cfg.vision.image_size
    index = json.loads((SHAPES_MODEL / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())


def test_shipped_model_answers_held_out_problems():
    llm = LLM(SHAPES_MODEL, kv_cache_memory="128MiB")
    problems = [generate(s) for s in HELD_OUT_SLICE]
    outs = llm.chat([p.messages() for p in problems], SamplingParams(temperature=0, max_tokens=128), use_tqdm=False)
    right = sum(final_answer(o.outputs[0].text) == p.answer for p, o in zip(problems, outs))
    assert right / len(problems) >= BOUND, f"{right}/{len(problems)} right, measured {MEASURED_GREEDY}"


def test_demo_runs_pacore_on_the_bundled_picture(capsys):
    """The demo's PaCoRe run ends in a well-formed answer to the bundled question, graded against its canonical
    answer. (Whether it is right: bench/shapes_demo.py over 10 seeds; the shipped model gets it 0 times in 10: it
    misreads this picture's sizes and kinds.)"""
    assert main(["demo", "--kv-cache-memory", "128MiB"]) == 0
    out = capsys.readouterr().out
    assert "round 1: K=16" in out and "final: K=1" in out
    answer = out.split("answer:\n", 1)[1].splitlines()[0]
    shapes, circles, colour = answer.split(", ")
    assert shapes.isdigit() and circles.isdigit() and colour in COLOURS
    verdict = "correct" if answer == "5, 2, purple" else "WRONG"
    assert f"expected: 5, 2, purple: {verdict}" in out


def test_demo_on_a_picture_of_ones_own(tmp_path, capsys):
    p = generate(14)  # a held-out picture saved as a user's file
    p.image().save(tmp_path / "mine.png")
    assert main(["demo", "--image", str(tmp_path / "mine.png"), p.question, "--preset", "low",
                 "--kv-cache-memory", "128MiB"]) == 0
    out = capsys.readouterr().out
    assert f"question: {p.question}" in out and "answer:" in out and "expected:" not in out


def test_demo_refuses_a_question_without_a_picture(capsys):
    assert main(["demo", "How many shapes are there?"]) == 2
    assert "--image" in capsys.readouterr().err
