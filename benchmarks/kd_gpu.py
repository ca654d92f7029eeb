"""A child's KD training on a CUDA GPU: mixed precision + channels_last against plain fp32.

The same child (the Fashion-MNIST ResNet-18 teacher shrunk to keep-ratio 0.3 everywhere,
about 11x fewer parameters) is distilled with the same seed, data, steps and learning rate,
once with ``amp=True, channels_last=True`` (bfloat16 autocast) and once with both off, then
once more with early-stopping checkpoints on. Reports wall time per step, validation and test
accuracy of each, so the GPU path of ``pipeline.children.distill`` is both checked and measured.

Usage (on a machine with a GPU)::

    python benchmarks/kd_gpu.py --teacher runs/teacher-fmnist-r18 \
        --data /usr/share/datasets/fashion-mnist [--steps 2000] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from envs.checkpoint import load_checkpoint  # noqa: E402
from envs.surgery import analyze, make_child  # noqa: E402
from pipeline.children.distill import distill  # noqa: E402
from pipeline.children.kd import KDSettings, teacher_logits  # noqa: E402
from pipeline.data.datasets import load_dataset  # noqa: E402
from pipeline.torch_utils import evaluate_accuracy  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--data", required=True, help="folder of the Fashion-MNIST idx files")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--out")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("kd_gpu: no CUDA device; run this on a machine with a GPU", file=sys.stderr)
        return 2
    splits = load_dataset("fashion-mnist", root=args.data, val_fraction=0.1, seed=0)
    ckpt = load_checkpoint(args.teacher)
    shape = ckpt.spec["base"]["input_shape"]
    units = [u.name for u in analyze(ckpt.model, shape).units if u.shrinkable]
    logits = teacher_logits(ckpt.model, splits.train[0], device="cuda")
    rows = []
    variants = [
        ("bf16 autocast + channels_last", {"amp": True, "channels_last": True}, None),
        ("fp32, NCHW", {"amp": False, "channels_last": False}, None),
        ("bf16 + channels_last, checkpoints at 25% and 50%", {"amp": True, "channels_last": True},
         [args.steps // 4, args.steps // 2]),
    ]  # fmt: skip
    for label, flags, checkpoints in variants:
        child, _ = make_child(ckpt.model, ckpt.spec, ratios=dict.fromkeys(units, 0.3))
        cfg = KDSettings(
            steps=args.steps, lr=0.05, schedule="cosine", batch_size=128, device="cuda", **flags
        )
        torch.cuda.synchronize()
        start = time.perf_counter()
        extra = (
            {"checkpoints": checkpoints, "on_checkpoint": lambda *_: False} if checkpoints else {}
        )
        result = distill(child, *splits.train, logits, *splits.val, cfg, **extra)
        wall = time.perf_counter() - start
        test = evaluate_accuracy(child, *splits.test)
        row = {
            "variant": label, "steps": result.steps, "wall_s": round(wall, 2),
            "ms_per_step": round(1e3 * result.train_time_s / result.steps, 3),
            "val_accuracy": result.accuracy, "test_accuracy": test,
            "curve": [list(point) for point in result.curve], "device": result.device,
            "gpu": torch.cuda.get_device_name(),
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    # Where mixed precision pays: a CIFAR-sized full-width ResNet-18 (the cifar10 presets).
    from envs.builders import build_model
    from envs.spec import base_spec

    base = base_spec("resnet18", [3, 32, 32], num_classes=10, in_channels=3, width=1.0)
    x = torch.randn(50 * 256, 3, 32, 32)
    y = torch.randint(0, 10, (len(x),))
    logits_big = torch.randn(len(x), 10)
    for label, flags in (("resnet18 w1.0 32x32 bf16 + channels_last", variants[0][1]),
                         ("resnet18 w1.0 32x32 fp32 NCHW", variants[1][1])):  # fmt: skip
        model = build_model(base)
        cfg = KDSettings(steps=200, lr=0.05, batch_size=256, device="cuda", **flags)
        result = distill(model, x, y, logits_big, x[:1024], y[:1024], cfg)
        row = {"variant": label, "steps": result.steps,
               "ms_per_step": round(1e3 * result.train_time_s / result.steps, 3),
               "gpu": torch.cuda.get_device_name()}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
