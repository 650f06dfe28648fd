"""Does the vision tower learn shape *kinds*? A probe of the `shapes` preset's ViT (width 128, 4 blocks, patch 8,
128 px, with the two downsamplers) trained directly to classify the one shape of a generated picture (circle,
square, rectangle, triangle; chance 25%) from its max-pooled features, from two initialisations: 0.02 everywhere
(what `make_tiny_checkpoint(for_training=True)` used before) and open_clip's (what it uses now).

    python bench/vision_probe.py [--steps 500] [--lr 1e-3] [--init open_clip|0.02] [--pool max|mean] [--frozen CKPT]

Prints the accuracy of the last 25 steps every 25 steps (batch 32, one thread).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def main() -> None:
    import torch

    from step3vl.config import VisionConfig
    from step3vl.model.vision import VisionEncoder
    from step3vl.processor.image import ImageSpec, preprocess_image
    from step3vl.tasks.shapes import KINDS, ShapesProblem, _place_shapes

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--init", choices=["open_clip", "0.02"], default="open_clip")
    # max: the head sees the strongest token; mean: every token weighs the same, as an untrained decoder's uniform
    # attention reads the image (does the kind signal survive being averaged with the background?)
    ap.add_argument("--pool", choices=["max", "mean"], default="max")
    # a trained checkpoint's vision tower, frozen: only the linear head trains, so the accuracy says how much kind
    # information its features carry (a random tower's features give ~30% this way)
    ap.add_argument("--frozen", type=Path, default=None, metavar="CKPT")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = VisionConfig(width=128, layers=4, heads=4, intermediate_size=512, image_size=128, patch_size=8)
    enc = VisionEncoder(cfg)
    w, L = cfg.width, cfg.layers
    for n, p in enc.named_parameters():
        std = 0.02
        if args.init == "open_clip":  # as step3vl/tools/make_tiny_checkpoint.py _vision_init_std
            std = {"in_proj": w ** -0.5, "out_proj": w ** -0.5 * (2 * L) ** -0.5, "c_proj": w ** -0.5 * (2 * L) ** -0.5,
                   "c_fc": (2 * w) ** -0.5, "conv1": (3 * cfg.patch_size ** 2) ** -0.5}.get(
                next((k for k in ("in_proj", "out_proj", "c_proj", "c_fc", "conv1") if k in n), ""), 0.02)
        with torch.no_grad():
            if n.endswith("gamma"):
                p.fill_(0.1)
            elif p.dim() == 1:
                p.fill_(1.0 if "ln" in n and n.endswith("weight") else 0.0)
            else:
                p.normal_(0, std)
    if args.frozen is not None:
        from step3vl.loader import load_model

        enc = load_model(args.frozen, dtype=torch.float32).vision_model.requires_grad_(False)
        cfg = enc.cfg
    head = torch.nn.Linear(4 * cfg.width, len(KINDS))
    trained = list(head.parameters()) + ([] if args.frozen is not None else list(enc.parameters()))
    opt = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.0)
    spec = ImageSpec(global_size=cfg.image_size, crops=False)

    def batch(seed0: int, b: int = 32):
        xs, ys = [], []
        for i in range(b):
            rng = random.Random(seed0 + i)
            width, height = rng.randint(224, 512), rng.randint(224, 512)
            shapes = None
            while shapes is None:
                shapes = _place_shapes(rng, width, height, 1)
            p = ShapesProblem(0, (width, height), (245, 245, 245), tuple(shapes), 1, ())
            xs.append(preprocess_image(p.image(), spec).global_view)
            ys.append(KINDS.index(shapes[0].kind))
        return torch.stack(xs), torch.tensor(ys)

    t0, acc = time.time(), []
    for step in range(args.steps):
        x, y = batch(step * 32)
        feats = enc(x)
        pooled = feats.amax(1) if args.pool == "max" else feats.mean(1)
        if args.frozen is not None:  # a trained tower's features are far from unit scale: standardise them
            pooled = torch.nn.functional.layer_norm(pooled, pooled.shape[-1:])
        logits = head(pooled)
        loss = torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        acc.append(float((logits.argmax(1) == y).float().mean()))
        if (step + 1) % 25 == 0:
            print(f"step {step + 1}: loss {loss.item():.3f}, accuracy (last 25 steps) {sum(acc[-25:]) / 25:.3f}, "
                  f"{time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
