"""Per-rank memory plan of sharded (FSDP2) training of STEP3-VL-10B: will a micro-batch of T tokens fit an 80 GB GPU
at data-parallel world size W?

    python -m step3vl plan-memory --world-sizes 8,16,64 --tokens 4096,8192,16384 [--no-mixed-precision] [--json]

The sharded state is derived twice, and the two must agree exactly:
- measured: the model is built on the meta device (no memory) and sharded with `fully_shard` over a fake process
  group (one process plays rank 0 of W), each vision block, each decoder layer and the root being one FSDP unit;
  the per-rank sizes are read from the DTensor shards;
- analytic: every tensor's shape written down from the config by hand, each split along dim 0 into W chunks of
  ceil(dim0 / W) rows (FSDP2 pads every tensor to that, so rank 0 always holds a full chunk: it is the busiest).

Training keeps fp32 master weights, fp32 gradients and AdamW's two fp32 moments: 16 bytes per sharded parameter.
Under mixed precision (FSDP2 `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`) the forward and
backward run on bf16 all-gathered copies and the activations are bf16. The activation estimate is a closed form
of what autograd saves in this project's model code (see `decoder_layer_saved_bytes`); the tests hold it against
what a real CPU forward saves. Everything here is computed, nothing is measured on a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass

import torch

from step3vl.config import Step3VLConfig, TextConfig, VisionConfig
from step3vl.model.vision import tokens_per_view

GIB = 2 ** 30
# What nvidia-smi reports as the capacity of an 80 GB H100/A100 (81559 MiB), less what the CUDA context, NCCL
# buffers and allocator fragmentation take in practice.
GPU_BYTES = 81559 * 2 ** 20
MARGIN_BYTES = 5 * GIB
FP32 = 4
ADAMW_MOMENTS = 2


def official_config_dict() -> dict:
    """config.json of STEP3-VL-10B as shipped on the hub (sizes from MODEL.md); a fresh dict per call."""
    vision = dict(width=1536, layers=47, heads=16, num_channels=3, image_size=728, mlp_ratio=8960 / 1536,
                  patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, ues_cls_token=False, use_ln_pre=True,
                  use_ln_post=False, use_abs_posemb=True, use_rope2d=True, ls_init_value=0.1, rope_theta=10000.0)
    text = dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=40960, hidden_act="silu",
                tie_word_embeddings=False, torch_dtype="bfloat16")
    return dict(model_type="step_robotics", architectures=["StepVLForConditionalGeneration"], vision_config=vision,
                text_config=text, understand_projector_stride=2, projector_bias=False, image_token_id=151679,
                torch_dtype="bfloat16")


def official_config() -> Step3VLConfig:
    return Step3VLConfig.from_dict(official_config_dict())


# -- the sharded state ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardSizes:
    """Element counts of one rank's share (rank 0, the one with the most) and of the FSDP units it all-gathers."""

    world_size: int
    total_numel: int  # every parameter of the model, unsharded and unpadded
    shard_numel: int  # this rank's local shards, summed
    root_unit_numel: int  # the root unit (embeddings, lm_head, vision stem, downsamplers, projector), all-gathered
    largest_block_numel: int  # the largest vision block / decoder layer, all-gathered (padding included)

    @property
    def param_bytes(self) -> int:
        return FP32 * self.shard_numel  # fp32 master weights

    @property
    def grad_bytes(self) -> int:
        return FP32 * self.shard_numel  # sharded fp32 gradients, shaped as the parameters

    @property
    def optimizer_bytes(self) -> int:
        return ADAMW_MOMENTS * FP32 * self.shard_numel


def _vision_block_shapes(v: VisionConfig) -> list[tuple[int, ...]]:
    w, m = v.width, v.intermediate_size
    shapes = [(w,)] * 4 + [(3 * w, w), (3 * w,), (w, w), (w,), (m, w), (m,), (w, m), (w,)]  # ln_1/2, attn, mlp
    return shapes + ([(w,)] * 2 if v.ls_init_value is not None else [])  # LayerScale gammas


def _decoder_layer_shapes(t: TextConfig) -> list[tuple[int, ...]]:
    h, i, d = t.hidden_size, t.intermediate_size, t.head_dim
    q, kv = t.num_attention_heads * d, t.num_key_value_heads * d
    return [(h,), (q, h), (kv, h), (kv, h), (h, q), (d,), (d,), (h,), (i, h), (i, h), (h, i)]


def _root_shapes(cfg: Step3VLConfig) -> list[tuple[int, ...]]:
    t = cfg.text
    shapes = [(t.vocab_size, t.hidden_size), (t.hidden_size,)]  # embed_tokens, final norm
    if not t.tie_word_embeddings:
        shapes.append((t.vocab_size, t.hidden_size))
    v = cfg.vision
    if v is not None:
        w = v.width
        shapes += [(w, v.num_channels, v.patch_size, v.patch_size), (v.grid_size ** 2, w), (w,), (w,),
                   (2 * w, w, 3, 3), (2 * w,), (4 * w, 2 * w, 3, 3), (4 * w,), (t.hidden_size, 4 * w)]
        shapes += [(t.hidden_size,)] if cfg.projector_bias else []
    return shapes


def fsdp_units(cfg: Step3VLConfig) -> list[list[tuple[int, ...]]]:
    """Parameter shapes per FSDP unit, root first, written from the config's sizes (not read from modules)."""
    blocks = [_vision_block_shapes(cfg.vision)] * cfg.vision.layers if cfg.vision is not None else []
    return [_root_shapes(cfg)] + blocks + [_decoder_layer_shapes(cfg.text)] * cfg.text.num_hidden_layers


def padded_shard_numel(shape: tuple[int, ...], world_size: int) -> int:
    # FSDP2 splits dim 0 as torch.chunk does and pads every rank's chunk to ceil(dim0 / W) rows.
    return math.ceil(shape[0] / world_size) * math.prod(shape[1:])


def analytic_shards(cfg: Step3VLConfig, world_size: int) -> ShardSizes:
    units = fsdp_units(cfg)
    per_unit = [sum(padded_shard_numel(s, world_size) for s in unit) for unit in units]
    return ShardSizes(world_size=world_size, total_numel=sum(math.prod(s) for unit in units for s in unit),
                      shard_numel=sum(per_unit), root_unit_numel=world_size * per_unit[0],
                      largest_block_numel=world_size * max(per_unit[1:], default=0))


def _local_numel(module: torch.nn.Module) -> int:
    return sum(p.to_local().numel() for p in module.parameters())


def measure_sharded(cfg: Step3VLConfig, world_size: int, mixed_precision: bool = True) -> ShardSizes:
    """Shard the model with training's own `shard_model` (one FSDP unit per vision block and decoder layer, plus
    the root) on a fake process group as rank 0 of `world_size`, on the meta device, and read back the per-rank
    sizes."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    from step3vl.distributed import DistEnv
    from step3vl.model.vlm import Step3VLForCausalLM
    from step3vl.train.fsdp import shard_model

    if dist.is_initialized():
        raise RuntimeError("measure_sharded: a process group already exists; run the dry run in its own process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        with torch.device("meta"):
            model = Step3VLForCausalLM(cfg)
        # On a GPU the all-gathers run in bf16 and the gradients reduce in fp32; on the meta device the policy
        # changes no size, it is passed so the dry run shards exactly what training shards.
        shard_model(model, DistEnv(0, world_size, 0, torch.device("cpu")), mixed_precision=mixed_precision)
        blocks = list(model.vision_model.transformer.resblocks) if cfg.vision is not None else []
        blocks += list(model.model.layers)
        block_numels = [_local_numel(b) for b in blocks]
        shard_numel = _local_numel(model)
        # An all-gather fills W padded chunks: W × rank 0's chunk is the unsharded size FSDP allocates.
        return ShardSizes(world_size=world_size, total_numel=sum(p.numel() for p in model.parameters()),
                          shard_numel=shard_numel, root_unit_numel=world_size * (shard_numel - sum(block_numels)),
                          largest_block_numel=world_size * max(block_numels, default=0))
    finally:
        dist.destroy_process_group()


# -- activations ----------------------------------------------------------------------------------------------

def decoder_layer_saved_bytes(t: TextConfig, act_bytes: int) -> int:
    """Bytes one Qwen3 decoder layer leaves saved for backward, per token (a = act_bytes: 2 for bf16, 4 for fp32).

    RMSNorm of n features over r rows: its fp32 input (4n: an upcast copy, or the input itself in fp32), rsqrt
    (4r), the normalised value kept for the weight's gradient (a·n), and the weight·value product (a·n) when a
    linear reads it. RoPE multiplies by tables that need no gradient, so autograd keeps only the tables.
      input norm:     4h + 4 + 2a·h              (q/k/v projections share the norm's output)
      q_norm, k_norm: 4n + 4·heads + a·n each    (n = Hq·d, Hkv·d; their outputs feed RoPE, which keeps nothing)
      q, k, v:        a·(Hq + 2·Hkv)·d           (rotated q and k, and v, kept by SDPA)
      RoPE tables:    4·a·d under bf16 (cos/sin cast per call, for q and for k); in fp32 all layers share one
      SDPA:           a·Hq·d output + 4·Hq logsumexp   (flash attention: no T×T scores)
      o_proj input:   a·Hq·d    (a copy of the output: packed sequences of unequal lengths are attended one by
                                 one and concatenated; equal lengths would make it a view, an overestimate there)
      post norm:      4h + 4 + 2a·h              (gate/up share its output)
      SwiGLU:         4a·I                       (gate, up, silu(gate), and their product for down_proj)
    """
    h, d, i, a = t.hidden_size, t.head_dim, t.intermediate_size, act_bytes
    hq, hkv = t.num_attention_heads, t.num_key_value_heads
    norms = 2 * (4 * h + 4 + 2 * a * h)
    head_norms = (4 + a) * (hq + hkv) * d + 4 * (hq + hkv)
    qkv = a * (hq + 2 * hkv) * d
    rope_tables = 4 * a * d if a != FP32 else 0
    attention = a * hq * d + 4 * hq + a * hq * d
    return norms + head_norms + qkv + rope_tables + attention + 4 * a * i


def vision_block_saved_bytes(v: VisionConfig, act_bytes: int) -> int:
    """Bytes one Perception-Encoder block leaves saved for backward, per patch.

      LayerNorms:     2·(a·w + 8)      (input, fp32 mean and rstd)
      in_proj:        a·w input, 3a·w fused q|k|v output (v is a view of it, kept by SDPA)
      2-D RoPE:       2a·w rotated q and k for SDPA (the fp32 rotation keeps nothing: its tables need no grad)
      SDPA:           a·w output (out_proj reads it as a view: one call for views of equal size) + 4·heads lse
      LayerScale 1, c_fc, LayerScale 2 inputs: 3a·w
      activation:     quick_gelu keeps c_fc's output and the sigmoid (2a·m), exact gelu its input (a·m);
                      c_proj's input a·m
    """
    w, m, a = v.width, v.intermediate_size, act_bytes
    act = (2 if v.hidden_act == "quick_gelu" else 1) * a * m
    return 2 * (a * w + 8) + 4 * a * w + 2 * a * w + a * w + 4 * v.heads + 3 * a * w + act + a * m


def vision_saved_bytes_per_view(v: VisionConfig, act_bytes: int) -> int:
    """One image_size² view through the whole tower: the blocks plus what wraps them."""
    patches = v.grid_size ** 2
    stem = v.num_channels * v.patch_size ** 2 * act_bytes + act_bytes * v.width + 8  # pixels for conv1, ln_pre
    rope_tables = 2 * 4 * v.head_dim  # fp32 cos/sin, shared by every block
    downsample = act_bytes * v.width * (1 + 2 / 4 + 4 / 16)  # inputs of the two stride-2 convs and the projector
    per_patch = v.layers * vision_block_saved_bytes(v, act_bytes) + stem + rope_tables + downsample
    return round(patches * per_patch)


@dataclass(frozen=True)
class ActivationEstimate:
    """Bytes of one micro-batch's activations: saved by the forward, and the transients of the backward."""

    decoder_layers: int  # saved by the decoder layers (only their inputs under activation checkpointing)
    vision: int  # saved by the vision tower (`enable_activation_checkpointing` does not checkpoint it)
    other: int  # embedding indices, RoPE tables, final norm, the LM head's input rows and targets
    recompute: int  # checkpointing only: one layer's activations, rebuilt during its backward
    head_chunk: int  # one chunk of logits rebuilt in the backward (log-softmax, its gradient, the logits' gradient)

    @property
    def saved(self) -> int:
        """What is alive between the end of the forward and the start of the backward."""
        return self.decoder_layers + self.vision + self.other

    @property
    def peak(self) -> int:
        return self.saved + self.recompute + self.head_chunk


def estimate_activations(cfg: Step3VLConfig, tokens: int, images: int, act_bytes: int, checkpointing: bool,
                         chunk_rows: int = 1024) -> ActivationEstimate:
    """A packed micro-batch of `tokens` LM tokens holding `images` global views (each tokens_per_view + 2 of the
    tokens); every token is taken to be a target (an upper bound: image tokens are not)."""
    t = cfg.text
    per_layer = decoder_layer_saved_bytes(t, act_bytes) * tokens
    if checkpointing:  # each layer keeps only its input; one layer at a time is recomputed in the backward
        decoder, recompute = t.num_hidden_layers * act_bytes * t.hidden_size * tokens, per_layer
    else:
        decoder, recompute = t.num_hidden_layers * per_layer, 0
    vision = images * vision_saved_bytes_per_view(cfg.vision, act_bytes) if cfg.vision is not None else 0
    rope = 2 * 4 * t.head_dim if act_bytes == FP32 else 0
    final_norm = 4 * t.hidden_size + 4 + act_bytes * t.hidden_size
    head_rows = act_bytes * t.hidden_size + 8 + 8  # the gathered hidden row, its index, its target
    other = tokens * (8 + rope + final_norm + head_rows)
    # The LM head runs checkpointed in chunks (logprobs.py): its backward rebuilds one [rows, vocab] chunk and holds
    # the fp32 log-softmax, its gradient and the logits' fp32 gradient, then casts that to the compute dtype.
    head_chunk = min(chunk_rows, tokens) * t.vocab_size * (3 * FP32 + act_bytes)
    return ActivationEstimate(decoder, vision, other, recompute, head_chunk)


# -- the plan -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryPlan:
    world_size: int
    tokens: int
    images: int
    mixed_precision: bool
    shards: ShardSizes
    full: ActivationEstimate  # no activation checkpointing
    checkpointed: ActivationEstimate  # decoder layers checkpointed

    @property
    def sharded_bytes(self) -> int:
        return self.shards.param_bytes + self.shards.grad_bytes + self.shards.optimizer_bytes

    @property
    def compute_bytes(self) -> int:
        return 2 if self.mixed_precision else FP32

    @property
    def fsdp_unsharded_bytes(self) -> int:
        """All-gathered weights and unsharded gradients while the micro-batch runs.

        The root unit is not resharded between forward and backward (FSDP2 keeps the root's parameters for the
        backward that follows at once), and its gradients wait for its reduce-scatter at the very end; counting all
        of them from the start of the backward is conservative (only lm_head's exist then). Of the blocks, one
        computes while the next is prefetched (2× its weights), with its gradient and the fp32 reduce-scatter
        input built from it.
        """
        c = self.compute_bytes
        root = 2 * c * self.shards.root_unit_numel
        return root + (2 * c + c + FP32) * self.shards.largest_block_numel

    @property
    def root_reduce_bytes(self) -> int:
        """The end of the backward, activations gone: the root's weights, gradients and fp32 reduce-scatter input."""
        return (2 * self.compute_bytes + FP32) * self.shards.root_unit_numel

    def peak_bytes(self, checkpointing: bool) -> int:
        act = self.checkpointed if checkpointing else self.full
        return self.sharded_bytes + max(self.fsdp_unsharded_bytes + act.peak, self.root_reduce_bytes)

    def fits(self, checkpointing: bool) -> bool:
        return self.peak_bytes(checkpointing) + MARGIN_BYTES <= GPU_BYTES


def analytic_plan(cfg: Step3VLConfig, world_size: int, tokens: int, mixed_precision: bool = True, images: int = 1,
                  chunk_rows: int = 1024) -> MemoryPlan:
    """The per-rank plan from closed forms only. images: 728-px global views in the micro-batch (each 2704
    patches through the ViT, 171 of the LM tokens)."""
    if cfg.vision is not None and images * (tokens_per_view(cfg.vision.image_size, cfg.vision.patch_size) + 2) > tokens:
        raise ValueError(f"{images} image(s) do not fit a micro-batch of {tokens} tokens")
    a = 2 if mixed_precision else FP32
    return MemoryPlan(world_size, tokens, images, mixed_precision, analytic_shards(cfg, world_size),
                      estimate_activations(cfg, tokens, images, a, False, chunk_rows),
                      estimate_activations(cfg, tokens, images, a, True, chunk_rows))


def plan(cfg: Step3VLConfig, world_sizes: list[int], tokens: list[int], mixed_precision: bool = True,
         images: int = 1) -> list[MemoryPlan]:
    """The dry run for each world size, checked against the closed form, then one plan per (W, T)."""
    plans = []
    for w in world_sizes:
        measured = measure_sharded(cfg, w, mixed_precision)
        if measured != analytic_shards(cfg, w):
            raise RuntimeError(f"W={w}: FSDP shards {measured} but the formula gives {analytic_shards(cfg, w)}")
        plans += [analytic_plan(cfg, w, t, mixed_precision, images) for t in tokens]
    return plans


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def format_table(plans: list[MemoryPlan]) -> str:
    """GiB per rank; "fits" allows MARGIN_BYTES for the CUDA context and fragmentation on an 80 GB GPU."""
    head = ["W", "T", "params", "grads", "AdamW", "unsharded", "act", "act+ckpt", "peak", "peak+ckpt",
            "fits 80 GB? (no ckpt / ckpt)"]
    rows = [[str(p.world_size), str(p.tokens)]
            + [_gib(n) for n in (p.shards.param_bytes, p.shards.grad_bytes, p.shards.optimizer_bytes,
                                 p.fsdp_unsharded_bytes, p.full.peak, p.checkpointed.peak, p.peak_bytes(False),
                                 p.peak_bytes(True))]
            + [f"{_yes(p.fits(False))} / {_yes(p.fits(True))}"] for p in plans]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(wd) for c, wd in zip(r, widths)) for r in [head] + rows]
    return "\n".join([lines[0], "  ".join("-" * wd for wd in widths)] + lines[1:])


def _notes(plans: list[MemoryPlan]) -> str:
    p = plans[0]
    dtype = "bf16 compute (MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32))" if p.mixed_precision \
        else "fp32 compute"
    return (f"{p.shards.total_numel / 1e9:.2f}B parameters; fp32 master weights, gradients, AdamW moments; {dtype}.\n"
            f"Each micro-batch of T tokens holds {p.images} 728-px image(s) (2704 patches, 171 tokens each); the "
            f"vision tower is not checkpointed ({_gib(p.full.vision)} GiB of its activations in every row).\n"
            f"'unsharded': the root unit (embeddings, lm_head, vision stem/downsamplers/projector, "
            f"{p.shards.root_unit_numel / 1e9:.2f}B) kept all-gathered with its gradients, plus one prefetched "
            f"block.\nGPU {GPU_BYTES / GIB:.1f} GiB less a {MARGIN_BYTES / GIB:.0f} GiB margin for the CUDA context "
            f"and fragmentation. Computed (fake process group, meta device), not measured on hardware.")


def _json_row(p: MemoryPlan) -> dict:
    sizes = dict(param_bytes=p.shards.param_bytes, grad_bytes=p.shards.grad_bytes,
                 optimizer_bytes=p.shards.optimizer_bytes, fsdp_unsharded_bytes=p.fsdp_unsharded_bytes,
                 activation_bytes=p.full.peak, activation_ckpt_bytes=p.checkpointed.peak)
    verdicts = dict(peak_bytes=p.peak_bytes(False), peak_ckpt_bytes=p.peak_bytes(True), fits=p.fits(False),
                    fits_ckpt=p.fits(True))
    return dict(asdict(p), **sizes, **verdicts)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="step3vl plan-memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--world-sizes", type=_ints, default=[8, 16, 64])
    ap.add_argument("--tokens", type=_ints, default=[4096, 8192, 16384], help="tokens per micro-batch")
    ap.add_argument("--images", type=int, default=1, help="728-px images per micro-batch")
    ap.add_argument("--no-mixed-precision", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    plans = plan(official_config(), args.world_sizes, args.tokens, not args.no_mixed_precision, args.images)
    if args.json:
        print(json.dumps([_json_row(p) for p in plans], indent=2))
    else:
        print(format_table(plans))
        print(_notes(plans))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
