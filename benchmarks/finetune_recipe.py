"""Which fine-tuning recipe gives the best student: one fixed student, the usual recipes.

Every method's final number rides on the shared KD fine-tuning (``finetune.*``), so it must not
be the weak link. This trains one fixed student (the teacher shrunk uniformly by surgery to
about teacher/10 parameters, its inherited weights as the start) with each recipe, two at a
time as Ray tasks like the real fine-tuning, and measures validation and test accuracy.

Usage::

    .venv/bin/python benchmarks/finetune_recipe.py \
        --teacher benchmarks/results/compare-fashion-mnist-resnet18/teacher
    .venv/bin/python benchmarks/finetune_recipe.py --quick   # digits, a few minutes

Writes ``recipes.json`` and ``recipes.md`` to ``--out``; each recipe's result is kept in
``done/`` as it finishes, so a rerun resumes (for the Fashion-MNIST preset ``done/`` is kept in
git, beside the comparison's teacher it uses).
"""

from __future__ import annotations

import argparse
import json
import os
import re
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--preset", default=None)
    p.add_argument("--teacher", help="teacher checkpoint folder (trained when missing)")
    p.add_argument("--ratio", type=float, default=0.3, help="uniform keep-ratio of the student")
    p.add_argument("--recipes", default=";".join(RECIPES), help="semicolon-separated subset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
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

    preset = args.preset or ("demo" if args.quick else "fashion-mnist-resnet18")
    overrides = ["finetune.steps=200"] if args.quick else []
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"recipes-{preset}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(preset, [*overrides, "data.split_seed=0", f"seed={args.seed}"])
    init_ray(cfg)
    splits = load_splits(cfg)
    teacher_dir = Path(args.teacher or out / "teacher").resolve()
    teacher = prepare_teacher(cfg, splits, teacher_dir, progress=True)
    units = [u.name for u in analyze(teacher.model, splits.input_shape).units if u.shrinkable]
    student, _ = make_child(teacher.model, teacher.spec, ratios=dict.fromkeys(units, args.ratio))
    params = count_params(student)
    payload = ray.put(make_payload(splits, teacher.model))
    test = ray.put((splits.test[0].numpy(), splits.test[1].numpy()))
    teacher_ref = ray.put(teacher.model)
    threads = max(1, int(cfg.ray.cpus_per_child))
    print(f"student: keep-ratio {args.ratio} everywhere, {params:,} params "
          f"({teacher.facts['params'] / params:.1f}x fewer than the teacher)", flush=True)  # fmt: skip

    def kept(name: str) -> Path:  # each recipe's result, kept as it finishes (a rerun resumes)
        return out / "done" / (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + ".json")

    refs = {}
    for name in args.recipes.split(";"):
        if kept(name).is_file():
            continue
        change = dict(RECIPES[name])
        factor = change.pop("steps_factor", 1)
        raw = cfg.model_dump()
        raw["finetune"] = {**raw["finetune"], **change, "steps": cfg.finetune.steps * factor}
        settings = finetune_settings(validate_config(raw))
        refs[name] = (settings, train_student_task.options(
            num_cpus=cfg.ray.cpus_per_child, scheduling_strategy="DEFAULT",
        ).remote(payload, student, settings, test, threads, 0.0,
                 teacher_ref if settings.augment != "none" else None))  # fmt: skip
    (out / "done").mkdir(exist_ok=True)
    for name, (_settings, ref) in refs.items():
        r = ray.get(ref)
        kept(name).write_text(json.dumps({
            "recipe": name, "val_accuracy": r["val_accuracy"], "test_accuracy": r["test_accuracy"],
            "kd_steps": r["kd_steps"], "teacher_forwards": r.get("teacher_forwards", 0),
            "wall_time_s": round(r["wall_time_s"], 1),
        }))  # fmt: skip
        print(f"{name}: val {r['val_accuracy']:.4f} test {r['test_accuracy']:.4f} "
              f"({r['wall_time_s']:.0f} s)", flush=True)  # fmt: skip
    results = [json.loads(kept(n).read_text()) for n in args.recipes.split(";")]
    teacher_test = teacher.facts["test_accuracy"]
    lines = ["| recipe | KD steps | val acc | test acc | delta (pts) | wall time |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in results:
        lines.append(f"| {r['recipe']} | {r['kd_steps']:,} | {r['val_accuracy']:.2%} | "
                     f"{r['test_accuracy']:.2%} | {100 * (r['test_accuracy'] - teacher_test):+.2f} | "
                     f"{r['wall_time_s'] / 60:.1f} min |")  # fmt: skip
    (out / "recipes.md").write_text("\n".join(lines) + "\n")
    doc = {"preset": preset, "student_params": params, "teacher": teacher.facts,
           "ratio": args.ratio, "results": results}  # fmt: skip
    (out / "recipes.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
