"""Which fine-tuning recipe, and which channels, give the best student: one fixed student.

Every method's final number rides on the shared KD fine-tuning (``finetune.*``), so it must not
be the weak link. This trains one fixed student (the teacher shrunk uniformly by surgery to
about teacher/10 parameters, its inherited weights as the start) with each recipe, two at a
time as Ray tasks like the real fine-tuning, and measures validation and test accuracy.

``--compare cuts`` keeps today's recipe and varies instead which channels the same student
keeps: each of Torch-Pruning's criteria on the teacher, and Network Slimming's start (the
teacher after its sparsity phase, ``baseline.sparsity_steps`` with L1 ``baseline.sparsity_l1``
on the BatchNorm scales) with the BatchNorm-scale or L1 criterion: what the search's
``search.sparsity_steps`` and ``shrinkage.importance`` would buy it, measured on one
architecture, so that nothing but the channels differs.

Usage::

    .venv/bin/python benchmarks/finetune_recipe.py \
        --teacher benchmarks/results/compare-fashion-mnist-resnet18/teacher
    .venv/bin/python benchmarks/finetune_recipe.py --compare cuts --seeds 2 \
        --teacher benchmarks/results/compare-fashion-mnist-resnet18/teacher
    .venv/bin/python benchmarks/finetune_recipe.py --quick   # digits, a few minutes

Writes ``recipes.json`` and ``recipes.md`` (``cuts.*``) to ``--out``; each result is kept in
``done/`` as it finishes, so a rerun resumes (for the Fashion-MNIST preset ``done/`` is kept in
git, beside the comparison's teacher it uses).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPES: dict[str, dict[str, Any]] = {
    "today (cosine, lr 0.05)": {},
    "+ shift+flip": {"augment": "shift+flip"},
    "+ shift": {"augment": "shift"},
    "+ warm-up 5%": {"warmup": 0.05},
    "+ label smoothing 0.1": {"label_smoothing": 0.1},
    "alpha 0.5 (more CE)": {"alpha": 0.5},
    "temperature 2": {"temperature": 2.0},
    "lr 0.1": {"lr": 0.1},
    "constant lr": {"schedule": "constant"},
    "2x steps": {"steps_factor": 2},
}
"""Each recipe changes the preset's fine-tuning (``finetune.*`` over ``distill.*``) in one way."""

CUTS: dict[str, dict[str, Any]] = {
    "L1 of filters (today)": {"importance": "l1"},
    "L2 of filters": {"importance": "l2"},
    "BatchNorm scale": {"importance": "bn"},
    "FPGM": {"importance": "fpgm"},
    "sparsity phase, then BatchNorm scale": {"importance": "bn", "sparse": True},
    "sparsity phase, then L1": {"importance": "l1", "sparse": True},
}
"""Each cut keeps the student's channels another way (``importance``), from the teacher or from
the teacher after slimming's sparsity phase (``sparse``)."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--preset", default=None)
    p.add_argument("--teacher", help="teacher checkpoint folder (trained when missing)")
    p.add_argument("--ratio", type=float, default=0.3, help="uniform keep-ratio of the student")
    p.add_argument("--compare", choices=("recipes", "cuts"), default="recipes")
    p.add_argument("--only", default=None, help="semicolon-separated subset of the variants")
    p.add_argument("--seeds", type=int, default=1, help="seeds per variant (0, 1, ...)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    variants = RECIPES if args.compare == "recipes" else CUTS
    names = args.only.split(";") if args.only else list(variants)
    unknown = [n for n in names if n not in variants]
    if unknown:
        p.error(f"--only {';'.join(unknown)} unknown; choose from {';'.join(variants)}")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray

    from envs.costs import count_params
    from envs.surgery import analyze, make_child
    from pipeline.children.payload import make_payload
    from pipeline.children.students import finetune_settings, train_student_task
    from pipeline.cluster.runtime import init_ray
    from pipeline.config.presets import load_config, validate_config
    from pipeline.data.datasets import load_splits
    from pipeline.data.teachers import prepare_teacher
    from pipeline.job.sparsity import sparsity_phase

    preset = args.preset or ("demo" if args.quick else "fashion-mnist-resnet18")
    overrides = ["finetune.steps=200", "baseline.sparsity_steps=40", "teacher.arch=resnet18",
                 "teacher.width=0.25", "teacher.epochs=4"] if args.quick else []  # fmt: skip
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"recipes-{preset}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(preset, [*overrides, "data.split_seed=0"])
    init_ray(cfg)
    splits = load_splits(cfg)
    teacher_dir = Path(args.teacher or out / "teacher").resolve()
    teacher = prepare_teacher(cfg, splits, teacher_dir, progress=True)
    units = [u.name for u in analyze(teacher.model, splits.input_shape).units if u.shrinkable]
    ratios = dict.fromkeys(units, args.ratio)
    params = count_params(make_child(teacher.model, teacher.spec, ratios=ratios)[0])
    payload = ray.put(make_payload(splits, teacher.model))
    test = ray.put((splits.test[0].numpy(), splits.test[1].numpy()))
    teacher_ref = ray.put(teacher.model)
    threads = max(1, int(cfg.ray.cpus_per_child))
    print(f"student: keep-ratio {args.ratio} everywhere, {params:,} params "
          f"({teacher.facts['params'] / params:.1f}x fewer than the teacher)", flush=True)  # fmt: skip

    def kept(name: str, seed: int) -> Path:  # each result, kept as it finishes (a rerun resumes)
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        return out / "done" / f"{slug}{'' if seed == 0 else f'-s{seed}'}.json"

    sparse: dict[int, Any] = {}  # the teacher after slimming's sparsity phase, per seed

    def student(name: str, seed_cfg: Any) -> tuple[Any, int]:
        cut = CUTS.get(name, {}) if args.compare == "cuts" else {}
        source = teacher.model
        if cut.get("sparse"):
            if seed_cfg.seed not in sparse:
                b = seed_cfg.baseline
                sparse[seed_cfg.seed] = sparsity_phase(
                    seed_cfg, payload, teacher.model, b.sparsity_steps, b.sparsity_l1
                )
            source = sparse[seed_cfg.seed][0]
        model, _ = make_child(source, teacher.spec, ratios=ratios,
                              importance=cut.get("importance", "l1"))  # fmt: skip
        return model, sparse[seed_cfg.seed][1]["kd_steps"] if cut.get("sparse") else 0

    refs = {}
    for seed in range(args.seeds):
        seed_cfg = load_config(preset, [*overrides, "data.split_seed=0", f"seed={seed}"])
        for name in names:
            if kept(name, seed).is_file():
                continue
            change = dict(RECIPES[name]) if args.compare == "recipes" else {}
            factor = change.pop("steps_factor", 1)
            raw = seed_cfg.model_dump()
            raw["finetune"] = {**raw["finetune"], **change, "steps": cfg.finetune.steps * factor}
            settings = finetune_settings(validate_config(raw))
            model, before = student(name, seed_cfg)
            refs[(name, seed)] = (before, train_student_task.options(
                num_cpus=cfg.ray.cpus_per_child, scheduling_strategy="DEFAULT",
            ).remote(payload, model, settings, test, threads, 0.0,
                     teacher_ref if settings.augment != "none" else None))  # fmt: skip
    (out / "done").mkdir(exist_ok=True)
    for (name, seed), (before, ref) in refs.items():
        r = ray.get(ref)
        kept(name, seed).write_text(json.dumps({
            "recipe": name, "seed": seed, "val_accuracy": r["val_accuracy"],
            "test_accuracy": r["test_accuracy"], "kd_steps": r["kd_steps"] + before,
            "teacher_forwards": r.get("teacher_forwards", 0),
            "wall_time_s": round(r["wall_time_s"], 1),
        }))  # fmt: skip
        print(f"{name} (seed {seed}): val {r['val_accuracy']:.4f} test {r['test_accuracy']:.4f} "
              f"({r['wall_time_s']:.0f} s)", flush=True)  # fmt: skip
    results = [json.loads(kept(n, seed).read_text()) for n in names for seed in range(args.seeds)]
    teacher_test = teacher.facts["test_accuracy"]
    lines = [f"| {args.compare[:-1]} | seeds | KD steps | val acc | test acc (each seed) | "
             "mean delta (pts) | wall time |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: |"]  # fmt: skip
    for name in names:
        rs = [r for r in results if r["recipe"] == name]
        test_mean = statistics.fmean(r["test_accuracy"] for r in rs)
        each = ", ".join(f"{r['test_accuracy']:.2%}" for r in rs)
        lines.append(
            f"| {name} | {len(rs)} | {rs[0]['kd_steps']:,} | "
            f"{statistics.fmean(r['val_accuracy'] for r in rs):.2%} | "
            f"{test_mean:.2%} ({each}) | "
            f"{100 * (test_mean - teacher_test):+.2f} | "
            f"{statistics.fmean(r['wall_time_s'] for r in rs) / 60:.1f} min |"
        )
    (out / f"{args.compare}.md").write_text("\n".join(lines) + "\n")
    doc = {"preset": preset, "student_params": params, "teacher": teacher.facts,
           "ratio": args.ratio, "seeds": args.seeds, "results": results}  # fmt: skip
    (out / f"{args.compare}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
