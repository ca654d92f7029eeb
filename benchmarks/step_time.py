"""Per-step cost of a child's KD training on the CPU: NCHW against channels_last.

Each model trains on random batches of 128 with one PyTorch thread (a child task's setting
with ``ray.cpus_per_child: 1``): forward, backward and an SGD step. The two memory formats
alternate, three rounds of ten timed steps each after three warm-up steps, and the median of
each round's median is kept, so that load elsewhere on the machine moves both sides alike.

A model that ``pipeline.torch_utils.channels_last_is_safe`` refuses (a strided 1x1 conv with few
input channels, where oneDNN's channels-last weight gradient is broken) trains in NCHW in the
pipeline, so only its NCHW step is measured: timing the broken kernel would crash, or time a
wrong result.

Usage::

    .venv/bin/python benchmarks/step_time.py     # about a minute; JSON in benchmarks/results/
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from envs.builders import build_model  # noqa: E402
from envs.spec import base_spec, teacher_spec  # noqa: E402
from envs.surgery import analyze, make_child  # noqa: E402
from pipeline.torch_utils import channels_last_is_safe  # noqa: E402

MODELS = [
    ("resnet18 w0.25, 28x28", "resnet18", 0.25, [1, 28, 28], None),
    ("resnet18 w0.25 shrunk to 0.3, 28x28", "resnet18", 0.25, [1, 28, 28], 0.3),
    ("resnet18 w0.5 shrunk to 0.6, 28x28", "resnet18", 0.5, [1, 28, 28], 0.6),
    ("vgg11 w0.25, 32x32", "vgg11", 0.25, [1, 32, 32], None),
    ("dwsep w0.5, 32x32", "dwsep", 0.5, [1, 32, 32], None),
    ("small_cnn w0.5, 8x8", "small_cnn", 0.5, [1, 8, 8], None),
]


def step_time(model: torch.nn.Module, channels_last: bool, shape: list[int]) -> float:
    """Median seconds of one training step over ten, after three warm-up steps."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    m = copy.deepcopy(model).to(memory_format=fmt).train()
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(128, *shape).contiguous(memory_format=fmt)
    target = torch.randn(128, 10)
    times = []
    for i in range(13):
        start = time.perf_counter()
        loss = F.mse_loss(m(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    for label, arch, width, shape, ratio in MODELS:
        base = base_spec(arch, shape, num_classes=10, in_channels=1, width=width)
        model = build_model(base)
        if ratio is not None:
            arch_info = analyze(model, shape)
            ratios = {u.name: ratio for u in arch_info.units if u.shrinkable}
            model, _ = make_child(model, teacher_spec(base), ratios=ratios)
        if not channels_last_is_safe(model, torch.device("cpu")):
            nchw = statistics.median(step_time(model, False, shape) for _ in range(3))
            rows.append({"model": label, "nchw_ms": 1e3 * nchw, "channels_last_ms": None,
                         "speedup": None})  # fmt: skip
            print(f"| {label} | {1e3 * nchw:.1f} ms | trains in NCHW (oneDNN#6035) | |")
            continue
        rounds = {"nchw": [], "channels_last": []}
        for _ in range(3):
            rounds["nchw"].append(step_time(model, False, shape))
            rounds["channels_last"].append(step_time(model, True, shape))
        nchw, cl = (statistics.median(rounds[k]) for k in ("nchw", "channels_last"))
        rows.append({"model": label, "nchw_ms": 1e3 * nchw, "channels_last_ms": 1e3 * cl,
                     "speedup": nchw / cl})  # fmt: skip
        print(f"| {label} | {1e3 * nchw:.1f} ms | {1e3 * cl:.1f} ms | {nchw / cl:.2f}x |")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_time.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
