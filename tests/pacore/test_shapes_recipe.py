"""The shapes recipe at toy size (every stage, resume) and the evaluation's statistics against hand computations."""

import json
import math
import shutil

import pytest
import torch

from step3vl_pacore.recipes.evaluate import majority, mean_interval, report, wilson
from step3vl_pacore.recipes.shapes import STAGES, ShapesRecipe, run_recipe
from step3vl.tasks.shapes import HELD_OUT_SEEDS


def _lines(path):
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe")
    run_recipe(ShapesRecipe.toy(out))
    return out


def test_toy_recipe_runs_every_stage(toy_run):
    r = ShapesRecipe.toy(toy_run)
    for ckpt in ("init", "vision", "pretrain", "rl", "synthesis"):
        assert (toy_run / ckpt / "config.json").is_file(), ckpt
        assert not list(toy_run.glob(f"{ckpt}-step*")), "step checkpoints are pruned once a stage is done"
    vis = _lines(toy_run / "vision.log.jsonl")
    assert [v["step"] for v in vis] == list(range(1, r.vision_steps + 1))
    assert all(set(v["accuracy"]) == {"kind", "colour"} for v in vis)
    pre = _lines(toy_run / "pretrain.log.jsonl")
    assert [p["step"] for p in pre] == list(range(1, len(pre) + 1)) and pre
    assert all(math.isfinite(p["loss"]) for p in pre)
    assert [x["step"] for x in _lines(toy_run / "rl.log.jsonl")] == list(range(1, r.rl_steps + 1))
    assert not (toy_run / "synthesis_sft").exists()  # by default the synthesis RL starts from the GRPO checkpoint
    assert [x["step"] for x in _lines(toy_run / "synthesis.log.jsonl")] == list(range(1, r.synthesis_steps + 1))
    pools = _lines(toy_run / "pools.jsonl")
    assert len(pools) == r.pool_problems and all(len(p["round_responses"][0]) == r.pool_rounds[0] for p in pools)
    for name in ("rl", "synthesis"):
        rep = json.loads((toy_run / f"eval-{name}.json").read_text())
        assert rep["problems"] == r.eval_problems
        assert [row["seed"] for row in rep["rows"]] == list(HELD_OUT_SEEDS)[:r.eval_problems]
        assert set(rep["overall"]) == {"greedy", "single", "sc4", "sc4", f"sc{r.eval_samples}", "pacore_low",
                                       "pacore_medium"}
    for png in ("eval.png", "training.png"):
        assert (toy_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stages = [t["stage"] for t in _lines(toy_run / "timings.jsonl")]
    assert set(stages) <= set(STAGES)


def test_interrupted_stage_resumes_to_the_same_run(toy_run, tmp_path, monkeypatch):
    """Pre-training killed after a saved step, run again, continues from that step: every step logged once, and
    it ends with the uninterrupted run's weights and losses (toy_run, same seed)."""
    import step3vl_pacore.recipes.shapes as recipe_mod
    from safetensors.torch import load_file

    out = tmp_path / "again"
    for name in ("init", "vision", "images"):
        shutil.copytree(toy_run / name, out / name)
    recipe = ShapesRecipe.toy(out)
    # Keep every step checkpoint this time, so the one before the kill is there.
    monkeypatch.setattr(recipe_mod, "_prune_steps", lambda path: None)
    keep_all = recipe_mod.pretrain
    monkeypatch.setattr(recipe_mod, "pretrain", lambda *a, **k: keep_all(*a, **{**k, "keep_saves": None}))
    run_recipe(recipe, ("pretrain",))
    monkeypatch.undo()
    steps = len(_lines(out / "pretrain.log.jsonl"))
    assert steps >= 3
    # The kill: after step `steps - 2` was saved, before the next save and the final checkpoint; the log
    # already has the last step's line (written before the save), which resuming must not duplicate.
    shutil.rmtree(out / "pretrain")
    shutil.rmtree(out / f"pretrain-step{steps}")
    shutil.rmtree(out / f"pretrain-step{steps - 1}")
    assert (out / f"pretrain-step{steps - 2}").is_dir()
    run_recipe(recipe, ("pretrain",))
    again, first = _lines(out / "pretrain.log.jsonl"), _lines(toy_run / "pretrain.log.jsonl")
    assert [x["step"] for x in again] == list(range(1, steps + 1))
    assert [x["loss"] for x in again] == pytest.approx([x["loss"] for x in first], rel=1e-5)
    shard = lambda d: load_file(next((d / "pretrain").glob("*.safetensors")))  # noqa: E731
    a, b = shard(out), shard(toy_run)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k].float() - b[k].float()).abs().max() <= 1e-2 * (b[k].float().abs().max() + 1e-3), k
    assert not list(out.glob("pretrain-step*"))


def test_majority_vote():
    assert majority(["3", "4", "3", None]) == "3"
    assert majority(["4", "3", "3", "4"]) == "4"  # tie: the answer seen first
    assert majority([None, None]) is None
    assert majority([None, "2"]) == "2"  # a response without an answer does not vote


def test_wilson_interval_hand_computed():
    # 8 of 10: centre (0.8 + z^2/20) / (1 + z^2/10), half-width z*sqrt(0.016 + z^2/400)/(1 + z^2/10)
    z = 1.959964
    den = 1 + z * z / 10
    centre = (0.8 + z * z / 20) / den
    half = z * math.sqrt(0.8 * 0.2 / 10 + z * z / 400) / den
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(centre - half) and hi == pytest.approx(centre + half)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson(10, 10)[1] == pytest.approx(1.0) and wilson(0, 10)[0] == pytest.approx(0.0, abs=1e-12)


def test_mean_interval_hand_computed():
    lo, hi = mean_interval([0.0, 1.0, 0.5, 0.5])
    sd = math.sqrt((0.25 + 0.25 + 0 + 0) / 3)
    assert (lo, hi) == pytest.approx((0.5 - 1.959964 * sd / 2, 0.5 + 1.959964 * sd / 2))


def test_report_aggregates_rows():
    rows = []
    for i, (t, k, g, single, sc4, sc, lo, med) in enumerate([
            (1, 2, 1.0, 0.75, 1.0, 1.0, 1.0, 1.0),
            (1, 3, 0.0, 0.25, 0.5, 0.0, 0.0, 1.0),
            (7, 3, 1.0, 0.5, 0.5, 1.0, 1.0, 0.0)]):
        rows.append({"seed": i, "template": t, "shapes": k, "greedy": g, "single": single, "sc4": sc4, "sc8": sc,
                     "pacore_low": lo, "pacore_medium": med,
                     "tokens": {"greedy": 10, "single": 12, "sc4": 48, "sc8": 96, "pacore_low": 70, "pacore_medium": 200}})
    rep = report(rows, 8, "m")
    assert rep["overall"]["single"]["accuracy"] == pytest.approx(0.5)
    assert rep["overall"]["sc8"]["accuracy"] == pytest.approx(2 / 3)
    assert rep["overall"]["pacore_medium"]["trajectories"] == 17
    assert rep["by_template"]["count"]["pacore_medium"]["accuracy"] == 1.0
    assert rep["by_template"]["composite"]["pacore_medium"]["accuracy"] == 0.0
    assert rep["by_shapes"]["3"]["greedy"]["n"] == 2
    assert rep["tokens_per_problem"]["pacore_medium"] == 200
    assert rep["pacore_medium_minus_sc"]["mean"] == pytest.approx(0.0)


def test_export_ships_a_loadable_checkpoint_with_its_card(toy_run, tmp_path):
    from step3vl_pacore.recipes.shapes import export_model
    from step3vl import LLM, SamplingParams
    from step3vl.tasks.shapes import generate

    dest = export_model(ShapesRecipe.toy(toy_run), tmp_path / "shipped")
    card = (dest / "README.md").read_text()
    assert "step3vl recipe shapes --out DIR --seed 0 --export DIR2 --export-checkpoint synthesis" in card
    assert "| pacore_medium | 17 |" in card and "| sc4 | 4 |" in card
    assert (dest / "eval.png").is_file() and (dest / "training.png").is_file()
    llm = LLM(dest, kv_cache_memory="32MiB")
    assert llm.processor.spec.crops is False  # the geometry travels in config.json
    out = llm.chat(generate(3).messages(), SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) >= 1
    again = export_model(ShapesRecipe.toy(toy_run), dest)  # replaces the old copy
    assert again == dest and not (tmp_path / "shipped.tmp").exists() and not (tmp_path / "shipped.old").exists()


def test_a_run_directory_refuses_other_settings(toy_run):
    with pytest.raises(ValueError, match=r"rl_steps: 2 there, 3 now"):
        run_recipe(ShapesRecipe.toy(toy_run, rl_steps=3), ("rl",))
    run_recipe(ShapesRecipe.toy(toy_run, progress=True), ())  # run-only settings may change


def test_vision_batches_label_the_one_drawn_shape():
    """The vision stage's pictures: one shape each, labelled with the kind and colour the generator drew (read
    back from the problem independently of the batch code), the same pictures for the same step."""
    from step3vl.processor.image import ImageSpec, preprocess_image
    from step3vl.tasks.shapes import COLOURS, KINDS, generate
    from step3vl_pacore.recipes import shapes_data as data

    spec = ImageSpec(global_size=64, crops=False)
    pixels, labels = data.vision_batch(3, 4, spec)
    assert pixels.shape == (4, 3, 64, 64)
    for j, seed in enumerate(range(data.VISION_SEEDS + 12, data.VISION_SEEDS + 16)):
        p = generate(seed, num_shapes=1)
        (shape,) = p.shapes
        assert KINDS[int(labels["kind"][j])] == shape.kind
        assert list(COLOURS)[int(labels["colour"][j])] == shape.colour
        assert torch.equal(pixels[j], preprocess_image(p.image(), spec).global_view)
    again, labels2 = data.vision_batch(3, 4, spec)
    assert torch.equal(again, pixels) and all(torch.equal(labels[k], labels2[k]) for k in labels)
    assert set(data.VISION_LABELS) == set(labels) and data.VISION_LABELS == {"kind": 4, "colour": 6}


def test_synthesis_records_read_with_the_models_own_readings(tmp_path):
    from step3vl.tasks.shapes import generate
    from step3vl_pacore.recipes import shapes_data as data

    p = generate(data.POOL_SEEDS + 3)
    record = {"request_id": p.id, "round_responses": [[
        {"content": "4", "reasoning_content": "1 red circle size 5\nshapes: 1"},
        {"content": "2", "reasoning_content": "", "finish_reason": "length"},  # never closed: no reading
        {"content": "3", "reasoning_content": "2 blue square size 3", "dropped": "empty"},
        {"content": "5", "reasoning_content": "1 green triangle size 9\nshapes: 1"}]]}
    own = data.pool_readings(record)
    assert own == ["1 red circle size 5\nshapes: 1", "1 green triangle size 9\nshapes: 1"]
    pools = {p.id: ["4", "2", "5", "4"]}
    recs = data.synthesis_records([p.id], pools, tmp_path, draws=6, seed=0, min_refs=2, max_refs=4,
                                  readings={p.id: own})
    assert len(recs) == 6
    for rec in recs:
        trace = rec["messages"][-1]["content"]
        head, reading, tail = trace.split("\n", 1)[0], trace.split("\n", 1)[1].split("\n</think>\n")[0], \
            trace.rsplit("\n", 1)[1]
        assert head.startswith("references: ") and reading in own and tail == p.answer
    assert {r["messages"][-1]["content"].split("\n")[1] for r in recs} == {o.split("\n")[0] for o in own}
    truth = data.synthesis_records([p.id], pools, tmp_path, draws=1, seed=0, min_refs=2, max_refs=4)
    assert truth[0]["messages"][-1]["content"].endswith(p.reasoning())


def test_synthesis_fine_tuning_when_asked_comes_before_the_synthesis_rl(toy_run, tmp_path):
    out = tmp_path / "sft"
    for name in ("init", "vision", "pretrain", "rl", "images"):
        shutil.copytree(toy_run / name, out / name)
    for name in ("pools.jsonl", "pools.done", "pool_problems.jsonl"):
        shutil.copy(toy_run / name, out / name)
    recipe = ShapesRecipe.toy(out, synthesis_sft_draws=1)
    run_recipe(recipe, ("synthesis_sft", "synthesis"))
    assert (out / "synthesis_sft" / "config.json").is_file() and _lines(out / "synthesis_sft.log.jsonl")
    assert (out / "synthesis" / "config.json").is_file()
    assert [x["step"] for x in _lines(out / "synthesis.log.jsonl")] == list(range(1, recipe.synthesis_steps + 1))
    from step3vl_pacore.recipes.shapes import model_card
    assert "4. synthesis fine-tuning: 1 synthesis prompts" in model_card(recipe, out / "synthesis", {}, None)
    assert "4. no synthesis fine-tuning" in model_card(ShapesRecipe.toy(out), out / "synthesis", {}, None)
