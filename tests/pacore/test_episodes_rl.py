"""PaCoRe synthesis episodes through the RL loop: the policy samples on the synthesis prompt of the official
template, is rewarded on its final message, and the engine follows the updated policy."""

from __future__ import annotations

import torch

from step3vl_pacore import EpisodeConfig, Problem, make_episodes, render_synthesis
from step3vl.engine import LLM
from step3vl.loader import load_model
from step3vl.train.optim import OptimConfig
from step3vl.train.rl import RLConfig, RLTrainer


def test_synthesis_episodes_train_on_the_template_prompt(tiny_dir):
    problems = [Problem("q1", [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "What is 2+2?"}], ground_truth="4"),
                Problem("q2", [{"role": "user", "content": "What is 3+3?"}], ground_truth="6")]
    pools = {"q1": [f"The answer is \\boxed{{{v}}}." for v in (4, 5, 3, 5, 7, 5)],
             "q2": [f"So \\boxed{{{v}}}." for v in (6, 1, 2, 9, 8)]}
    cfg = EpisodeConfig(min_refs=3, max_refs=4, max_correct_fraction=0.5, seed=1)
    episodes = make_episodes(problems, pools, cfg)
    assert [e.problem_id for e in episodes] == ["q1", "q2"]

    llm = LLM(tiny_dir, kv_cache_memory="16MiB")
    trainer = RLTrainer(load_model(tiny_dir, dtype=torch.float32), llm, lambda text, gold: float(gold in text),
                        RLConfig(optim=OptimConfig(lr=1e-3, weight_decay=0.0), group_size=4, max_tokens=6))
    prompts = [e.rl_prompt() for e in episodes]
    rollouts = trainer.rollout(prompts)
    tok = llm.processor.tokenizer
    for ep in episodes:
        seen = next(r for r in rollouts if prompts[r.prompt_index].id == ep.problem_id)
        prompt_ids = [t for t, lab in zip(seen.example.input_ids, seen.example.labels) if lab == -100]
        original = "What is 2+2?" if ep.problem_id == "q1" else "What is 3+3?"
        assert render_synthesis(original, ep.ref_responses) in tok.decode(prompt_ids)
    log = trainer.step(prompts)
    assert log.step == 1 and log.response_tokens > 0


def test_episode_batches_draw_fresh_references_each_step_and_resume():
    from step3vl_pacore.episodes import EpisodeBatches

    problems = [Problem(f"q{i}", [{"role": "user", "content": f"{i}+{i}?"}], ground_truth=str(2 * i))
                for i in range(4)]
    pools = {p.id: [f"\\boxed{{{v}}}" for v in range(20)] for p in problems}
    pools["q3"] = [f"\\boxed{{{6}}}"] * 5  # every reference right: always filtered
    cfg = EpisodeConfig(min_refs=3, max_refs=5, max_correct_fraction=0.5, seed=2)
    batches = EpisodeBatches(problems, pools, cfg, batch_size=2)
    first = batches(0)
    state = batches.state_dict()
    rest = [batches(k) for k in range(1, 6)]
    assert all(len(b) == 2 for b in [first, *rest])
    assert all(p.id != "q3" for b in [first, *rest] for p in b)
    texts = [p.messages[-1]["content"] for b in [first, *rest] for p in b if p.id == "q0"]
    assert len(texts) >= 2 and len(set(texts)) == len(texts)  # a new reference set at every draw
    again = EpisodeBatches(problems, pools, cfg, batch_size=2)
    again.load_state_dict(state)
    assert [[(p.id, p.messages[-1]["content"]) for p in again(k)] for k in range(1, 6)] == \
        [[(p.id, p.messages[-1]["content"]) for p in b] for b in rest]
