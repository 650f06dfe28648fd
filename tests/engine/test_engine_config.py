"""EngineConfig: each engine setting declared once, reaching the engine the same way from `LLM(**kwargs)`,
`LLM(config=...)` and the generated CLI flags; errors name the field."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
from PIL import Image

from step3vl.engine import LLM, SamplingParams
from step3vl.engine.config import EngineConfig
from step3vl.processor.image import ImageError


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    EngineConfig.add_cli_args(p)
    return p.parse_args(argv)


def test_kwargs_config_and_flags_build_the_same_engine(tiny_ckpt):
    settings = dict(max_num_seqs=8, block_size=8, kv_cache_memory="8MiB", max_logprobs=5, seed=3,
                    scheduling_policy="priority", max_image_pixels=1_000_000)
    by_kwargs = LLM(tiny_ckpt, **settings)
    by_config = LLM(config=EngineConfig(model=str(tiny_ckpt), **settings))
    flags = _parse(["--max-num-seqs", "8", "--block-size", "8", "--kv-cache-memory", "8MiB", "--max-logprobs", "5",
                    "--seed", "3", "--scheduling-policy", "priority", "--max-image-pixels", "1000000"])
    by_flags = LLM(config=EngineConfig.from_cli_args(flags, model=str(tiny_ckpt)))
    assert by_kwargs.config == by_config.config == by_flags.config
    for llm in (by_kwargs, by_flags):  # the settings reached the parts that use them
        assert llm.engine.scheduler.max_num_seqs == 8 and llm.kv_stats()["block_size"] == 8
        assert llm.engine.config.scheduler.policy == "priority" and llm.engine.config.max_logprobs == 5
        assert llm.processor.spec.max_pixels == 1_000_000
    assert "max_num_seqs=8" in str(by_kwargs.config) and "scheduling_policy='priority'" in str(by_kwargs.config)


def test_every_field_has_a_flag_with_help_and_its_default():
    p = argparse.ArgumentParser()
    EngineConfig.add_cli_args(p)
    actions = {a.dest: a for a in p._actions}
    for f in dataclasses.fields(EngineConfig):
        if f.name == "model":
            continue
        assert f.name in actions, f.name
        shown = actions[f.name].help.replace("%%", "%")
        assert shown and ("(default: " in shown) and actions[f.name].default == f.default
    assert EngineConfig.from_cli_args(_parse([])) == EngineConfig()
    assert EngineConfig.from_cli_args(_parse(["--no-cpu-kernels", "--use-kernels"])).cpu_kernels is False


@pytest.mark.parametrize("bad, field", [({"block_size": 12}, "block_size"), ({"max_num_seqs": 0}, "max_num_seqs"),
                                        ({"dtype": "int8"}, "dtype"), ({"gpu_memory_utilization": 1.5},
                                                                       "gpu_memory_utilization"),
                                        ({"scheduling_policy": "lifo"}, "scheduling_policy"),
                                        ({"max_image_pixels": -1}, "max_image_pixels")])
def test_validation_names_the_field(bad, field):
    with pytest.raises(ValueError, match=rf"EngineConfig\.{field} "):
        EngineConfig(**bad)


def test_unknown_settings_and_tensor_parallelism_are_refused(tiny_ckpt):
    with pytest.raises(TypeError, match="max_num_seq"):
        LLM(tiny_ckpt, max_num_seq=4)
    with pytest.raises(ValueError, match="tensor_parallel_size 2: this engine runs on one GPU"):
        LLM(tiny_ckpt, tensor_parallel_size=2)


def test_gpu_memory_utilization_sizes_the_pool(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (1000, 4000))
    assert LLM._default_kv_bytes(torch.device("cuda"), 0.25) == 250


def test_the_image_limit_reaches_requests(tiny_ckpt):
    llm = LLM(tiny_ckpt, kv_cache_memory="8MiB", max_image_pixels=10_000)
    image = Image.new("RGB", (200, 100))  # 20,000 pixels
    with pytest.raises(ImageError, match="exceeds the limit of 10,000 pixels"):
        llm.chat([[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "what?"}]}]],
                 SamplingParams(max_tokens=2), use_tqdm=False)


def test_the_parts_receive_the_resolved_config(tiny_ckpt):
    """EngineCore, its scheduler and its runner get EngineConfig.resolve()'s parts, not loose arguments: the CPU
    defaults (no kernels, cascade on) and the given settings arrive where they are used."""
    from step3vl.engine.config import CoreConfig, RunnerConfig, SchedulerConfig

    llm = LLM(tiny_ckpt, kv_cache_memory="8MiB", max_num_batched_tokens=64, max_num_seqs=3, cascade_attention=False,
              encoder_cache_memory="1MiB", seed=5)
    core = llm.engine
    assert core.config is llm.core_config and isinstance(core.config, CoreConfig)
    assert core.scheduler.config == SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=3, policy="fcfs")
    assert core.runner.config == RunnerConfig(use_kernels=False, cascade_attention=False, cpu_kernels=True,
                                              encoder_cache_bytes=1 << 20)
    assert core.runner.cascade_attention is False and core.runner.images.cache.capacity == 1 << 20
    assert core.config.seed == 5 and core.config.max_model_len == llm.max_model_len
    with pytest.raises(ValueError, match="scheduling_policy 'lifo'"):
        SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=1, policy="lifo")
