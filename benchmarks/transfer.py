"""Does a policy learned on one teacher speed up the search on another? (N2N's transfer)

On Fashion-MNIST, a ResNet-34 (width 0.25) teacher is compressed to ``--compression`` twice
per seed: from scratch, and starting both stages from the final policies of a finished search
on the ResNet-18 teacher (``--policy-from``), with the same child budget. For each it records
the best search reward against children evaluated, the children the transferred search needs
to reach the from-scratch search's final best reward, and the final students' size and test
accuracy.

Usage::

    .venv/bin/python benchmarks/transfer.py --source RUN_DIR_OF_A_RESNET18_SEARCH --seeds 2

Writes ``transfer.json``, ``transfer.md`` and ``transfer.png`` to ``--out``; each run resumes
(a finished one is reused).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def reached(values: list[float], target: float) -> int | None:
    """Children evaluated until the best reward first reached ``target`` (None: never)."""
    return next((i + 1 for i, v in enumerate(values) if v >= target - 1e-12), None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, help="run directory of a ResNet-18 search")
    p.add_argument("--teacher", default=str(ROOT / "runs" / "teacher-fmnist-r34"),
                   help="ResNet-34 teacher checkpoint (trained there when missing)")  # fmt: skip
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--compression", type=float, default=10.0)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "transfer"))
    args = p.parse_args(argv)
    from rich.console import Console

    from pipeline.config import environment

    environment.apply()
    environment.quiet_ray_loggers()
    from pipeline.cluster.runtime import init_ray
    from pipeline.config.presets import load_config
    from pipeline.data.datasets import load_splits
    from pipeline.data.teachers import prepare_teacher
    from pipeline.job.run import run
    from pipeline.tracking.rundir import RunDir

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    source = Path(args.source).resolve()
    teacher = Path(args.teacher).resolve()
    console = Console(highlight=False)
    base = ["teacher.arch=resnet34", "teacher.width=0.25", "data.split_seed=0",
            "tracking.enabled=false", f"budget.compression={args.compression}",
            *args.overrides]  # fmt: skip
    cfg = load_config("fashion-mnist-resnet18", [*base, "name=transfer-teacher"])
    init_ray(cfg)
    splits = load_splits(cfg)
    if not (teacher / "weights.pt").is_file():
        console.print(f"[bold]teacher[/]: training ResNet-34 (width 0.25) into {teacher}")
        prepare_teacher(cfg, splits, teacher, progress=True)

    results: dict[str, list[dict[str, Any]]] = {"scratch": [], "transfer": []}
    for seed in range(args.seeds):
        for mode in results:
            folder = out / f"{mode}-s{seed}"
            keys = [f"search.policy_from={source}"] if mode == "transfer" else []
            if not (folder / "summary.json").is_file():
                console.rule(f"{mode}, seed {seed}")
                rcfg = load_config("fashion-mnist-resnet18", [
                    *base, *keys, f"teacher.checkpoint={teacher}", f"seed={seed}",
                    f"output.run_dir={folder}", f"name=transfer-{mode}-s{seed}",
                ]).resolve_paths()  # fmt: skip
                resume = (folder / "config.yaml").is_file()
                run(rcfg, resume=resume, console=console, splits=splits)
            summary = RunDir(folder).summary()
            results[mode].append({
                "seed": seed, "curve": RunDir(folder).best_curve(), "student": summary["student"],
                "wall_time_s": summary["wall_time_s"], "teacher": summary["teacher"],
            })  # fmt: skip

    rows = []
    for seed in range(args.seeds):
        scratch, moved = results["scratch"][seed], results["transfer"][seed]
        target = scratch["curve"][-1]
        rows.append({
            "seed": seed, "scratch_best": target, "transfer_best": moved["curve"][-1],
            "children": len(scratch["curve"]),
            "transfer_reaches_scratch_best_at": reached(moved["curve"], target),
            "scratch_reaches_its_best_at": reached(scratch["curve"], target),
            "scratch_params": scratch["student"]["params"],
            "transfer_params": moved["student"]["params"],
            "scratch_test": scratch["student"]["test_accuracy"],
            "transfer_test": moved["student"]["test_accuracy"],
            "scratch_wall_s": scratch["wall_time_s"], "transfer_wall_s": moved["wall_time_s"],
        })  # fmt: skip
    teacher_facts = results["scratch"][0]["teacher"]
    lines = [
        f"Teacher: ResNet-34 (width 0.25), {teacher_facts['params']:,} params, "
        f"{teacher_facts['test_accuracy']:.2%} test; budget teacher/{args.compression:g}.",
        "",
        "| seed | search | final best reward | children to reach scratch's best | student params "
        "| test acc | wall time |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        for mode in ("scratch", "transfer"):
            at = r["scratch_reaches_its_best_at"] if mode == "scratch" else r[
                "transfer_reaches_scratch_best_at"]  # fmt: skip
            lines.append(
                f"| {r['seed']} | {mode} | {r[f'{mode}_best']:.4f} | "
                f"{at if at is not None else 'never'} of {r['children']} | "
                f"{r[f'{mode}_params']:,} | {r[f'{mode}_test']:.2%} | "
                f"{r[f'{mode}_wall_s'] / 60:.1f} min |"
            )
    (out / "transfer.md").write_text("\n".join(lines) + "\n")
    doc = {"source": str(source), "rows": rows, "results": results,
           "mean_transfer_test": statistics.fmean(r["transfer_test"] for r in rows),
           "mean_scratch_test": statistics.fmean(r["scratch_test"] for r in rows)}  # fmt: skip
    (out / "transfer.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    figure(results).savefig(out / "transfer.png")
    console.print("\n".join(lines))
    return 0


def figure(results: dict[str, list[dict[str, Any]]]) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=120)
    ax = fig.add_subplot()
    for (mode, runs), color in zip(results.items(), ("C0", "C1"), strict=True):
        for i, r in enumerate(runs):
            ax.plot(range(1, len(r["curve"]) + 1), r["curve"], color=color,
                    ls="-" if i == 0 else "--", label=f"{mode} (seed {r['seed']})")  # fmt: skip
    ax.set_xlabel("children evaluated")
    ax.set_ylabel("best search reward so far")
    ax.set_title("ResNet-34 teacher: search from scratch vs from ResNet-18's policy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(main())
