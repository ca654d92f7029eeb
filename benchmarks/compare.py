"""Head to head on one teacher: N2N (PPO, APPO), random search and the classic compressors.

Every method starts from the same trained teacher, scores on the same validation split,
ends with the same KD fine-tuning budget (``finetune.steps``) and is tested once on the same
test split:

- ``n2n-ppo`` / ``n2n-appo``: ``n2n run`` with RLlib PPO or APPO (removal, shrinkage,
  fine-tuning of the top-k);
- ``random``: random search with the same child budget (``n2n baseline random``);
- ``structured-l1``, ``slimming``, ``kd-student``: at the parameter count the N2N (PPO)
  student reached, and at 10x and 20x fewer parameters than the teacher;
- ``l1-unstructured``: magnitude pruning over its sweep of amounts.

Usage::

    .venv/bin/python benchmarks/compare.py            # Fashion-MNIST, ResNet-18 (w 0.25) teacher
    .venv/bin/python benchmarks/compare.py --quick    # digits, a few minutes (used by a test)

Outputs in ``--out`` (default ``benchmarks/results/compare-<preset>``): ``table.md``,
``results.json`` (every record, the machine, the settings), ``pareto.png`` (test accuracy
against parameters, log scale), and one run directory per method. Everything is logged to
MLflow as one parent run with a nested run per method. A method whose ``result.json`` exists
is not run again (``--fresh`` reruns everything), so an interrupted benchmark continues.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("compare")

METHODS = (
    "n2n-ppo", "structured-l1", "slimming", "kd-student", "l1-unstructured", "random", "n2n-appo",
)  # fmt: skip
"""In the order they run: the N2N (PPO) student's size sets the budgeted methods' budget."""
BUDGETED = ("structured-l1", "slimming", "kd-student")
FULL_PRESET = "fashion-mnist-resnet18"
QUICK_PRESET = "demo"
QUICK_OVERRIDES = [
    "teacher.epochs=6", "distill.steps=40", "finetune.steps=120", "finetune.top_k=1",
    "removal.iterations=2", "removal.episodes_per_iteration=3",
    "shrinkage.iterations=2", "shrinkage.episodes_per_iteration=3",
    "baseline.amounts=[0.5,0.9]", "baseline.sparsity_steps=20", "baseline.round_steps=20",
]  # fmt: skip
"""``--quick``: the demo preset on digits, cut to a few minutes in all."""
FULL_OVERRIDES = ["baseline.amounts=[0.8,0.95]"]
"""The full run: l1-unstructured fine-tunes a dense teacher-sized model per amount (the most
expensive student here), so its sweep is cut to two amounts to keep the benchmark near an
hour; ``n2n baseline l1-unstructured`` sweeps the preset's whole list."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="digits and tiny budgets (minutes)")
    p.add_argument("--preset", help=f"preset to compare on (default {FULL_PRESET})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    p.add_argument("--teacher", help="teacher checkpoint folder; default trains one into --out")
    p.add_argument("--out", help="output folder (default benchmarks/results/compare-<preset>)")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default sqlite in --out)")
    p.add_argument("--experiment", default="n2n-compare", help="MLflow experiment")
    p.add_argument("--fresh", action="store_true", help="rerun methods that already have results")
    args = p.parse_args(argv)
    unknown = sorted(set(args.methods.split(",")) - set(METHODS))
    if unknown:
        p.error(f"--methods {','.join(unknown)} unknown; choose from {','.join(METHODS)}")
    return args


def method_config(base: list[str], preset: str, method: str, teacher: Path, out: Path) -> Any:
    """The run config of one method: the shared settings, its own run directory, no MLflow."""
    from pipeline.config.presets import load_config

    algo = {"n2n-ppo": "ppo", "n2n-appo": "appo", "random": "random"}.get(method, "ppo")
    cfg = load_config(preset, [
        *base, f"teacher.checkpoint={teacher}", f"output.run_dir={out / method}",
        "tracking.enabled=false", f"search.algo={algo}", f"name=compare-{method}",
    ])  # fmt: skip
    return cfg.resolve_paths()


def run_method(method: str, cfg: Any, splits: Any, targets: list[int] | None) -> dict[str, Any]:
    """Runs one method; returns ``{"records", "wall_time_s", "child_evaluations", ...}``."""
    from rich.console import Console

    from pipeline.baselines.run import run_baseline, with_records
    from pipeline.job.run import run

    console = Console(highlight=False)
    started = time.monotonic()
    if method.startswith("n2n-"):
        summary = with_records(run(cfg, console=console, splits=splits), method)
    else:
        summary = run_baseline(
            cfg, method, console=console, splits=splits, targets=targets
        )
    return {
        "method": method,
        "records": summary["records"],
        "child_evaluations": summary["child_evaluations"],
        "wall_time_s": round(time.monotonic() - started, 1),
        "teacher": summary["teacher"],
        "summary": {k: v for k, v in summary.items() if k not in ("records", "students")},
    }


def table_rows(results: dict[str, dict[str, Any]], teacher: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per student worth comparing: a search's final student, each baseline record."""
    rows = []
    for method, result in results.items():
        records = [r for r in result["records"] if not r.get("error")]
        if method.startswith("n2n-") or method == "random":
            records = [r for r in records if r.get("best")] or records[:1]
        for r in records:
            rows.append({
                "method": method, "label": r["label"], "params": r["params"],
                "nonzero_params": r["nonzero_params"], "compression": r["compression"],
                "sparse_compression": r["sparse_compression"], "flops": r["flops"],
                "val_accuracy": r["val_accuracy"], "test_accuracy": r["test_accuracy"],
                "delta_points": 100 * (r["test_accuracy"] - teacher["test_accuracy"]),
                "child_evaluations": r["child_evaluations"], "wall_time_s": r["wall_time_s"],
                "method_wall_time_s": result["wall_time_s"],
            })  # fmt: skip
        for r in result["records"]:
            if r.get("error"):
                rows.append({"method": method, "label": r["label"], "error": r["error"]})
    return rows


def markdown(rows: list[dict[str, Any]], teacher: dict[str, Any]) -> str:
    head = (
        "| method | student | params | non-zero | smaller | FLOPs | val acc | test acc | "
        "delta (pts) | child evals | wall time |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    lines = [
        f"| teacher | {teacher['arch']} | {teacher['params']:,} | {teacher['params']:,} | 1.0x | "
        f"{teacher['flops']:,} | {teacher['val_accuracy']:.2%} | {teacher['test_accuracy']:.2%} "
        "| 0.00 | - | - |"
    ]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['method']} | {r['label']} | failed: {r['error'][:80]} |||||||||")
            continue
        smaller = f"{r['compression']:.1f}x"
        if r["nonzero_params"] < r["params"]:
            smaller += f" ({r['sparse_compression']:.1f}x sparse)"
        lines.append(
            f"| {r['method']} | {r['label']} | {r['params']:,} | {r['nonzero_params']:,} | "
            f"{smaller} | {r['flops']:,} | {r['val_accuracy']:.2%} | {r['test_accuracy']:.2%} | "
            f"{r['delta_points']:+.2f} | {r['child_evaluations']} | "
            f"{_minutes(r['method_wall_time_s'])} |"
        )
    return head + "\n".join(lines) + "\n"


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def pareto_figure(rows: list[dict[str, Any]], teacher: dict[str, Any]) -> Any:
    """Test accuracy against parameters (log scale); sparse models at their non-zero count."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=120)
    ax = fig.add_subplot()
    markers = dict(zip(METHODS, "o^vsDPX", strict=True))
    for method in METHODS:
        sparse = method == "l1-unstructured"
        mine = [r for r in rows if r["method"] == method and not r.get("error")]
        mine.sort(key=lambda r: r["nonzero_params" if sparse else "params"])
        if not mine:
            continue
        xs = [r["nonzero_params" if sparse else "params"] for r in mine]
        ys = [100 * r["test_accuracy"] for r in mine]
        label = method + (" (non-zero params)" if sparse else "")
        ax.plot(xs, ys, marker=markers[method], ls="-" if len(xs) > 1 else "", label=label,
                mfc="none" if sparse else None)  # fmt: skip
    ax.scatter([teacher["params"]], [100 * teacher["test_accuracy"]], marker="*", s=220,
               color="gold", edgecolor="black", zorder=4, label="teacher")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy against size on one teacher, equal fine-tuning budget")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def machine() -> dict[str, Any]:
    import torch

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
         if ln.startswith("model name")), platform.processor(),
    ) if Path("/proc/cpuinfo").is_file() else platform.processor()  # fmt: skip
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
            check=False,
        ).stdout.strip()  # fmt: skip
    except OSError:
        commit = ""
    return {
        "cpus": os.cpu_count(), "cpu": cpu, "gpu": torch.cuda.is_available(),
        "torch": torch.__version__, "python": platform.python_version(), "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }  # fmt: skip


def log_mlflow(args: argparse.Namespace, out: Path, results: dict, rows: list, doc: dict) -> str:
    """One parent run, a nested run per method; returns the parent run id."""
    import mlflow

    from pipeline.tracking.tracker import Tracker

    uri = args.tracking_uri or f"sqlite:///{out / 'mlflow.db'}"
    tracker = Tracker(uri, args.experiment)
    tracker.check_reachable()
    client = tracker.client
    parent = client.create_run(tracker.experiment_id, run_name=out.name,
                               tags={"n2n.benchmark": "compare", "n2n.preset": doc["preset"]})  # fmt: skip
    pid = parent.info.run_id
    client.log_dict(pid, doc, "results.json")
    for name in ("table.md", "pareto.png"):
        client.log_artifact(pid, str(out / name))
    for method, result in results.items():
        run = client.create_run(tracker.experiment_id, run_name=method,
                                tags={"mlflow.parentRunId": pid, "n2n.method": method})  # fmt: skip
        rid = run.info.run_id
        client.log_param(rid, "method", method)
        best = next((r for r in rows if r["method"] == method and not r.get("error")), None)
        metrics = {
            "wall_time_s": result["wall_time_s"],
            "child_evaluations": result["child_evaluations"],
        }
        if best is not None:
            metrics |= {"student/params": best["params"], "student/accuracy": best["test_accuracy"],
                        "student/val_accuracy": best["val_accuracy"],
                        "compression/ratio": best["compression"]}  # fmt: skip
        for key, value in metrics.items():
            client.log_metric(rid, key, float(value))
        client.log_dict(rid, {"records": result["records"]}, "records.json")
        client.set_terminated(rid, "FINISHED")
    client.set_terminated(pid, "FINISHED")
    mlflow.set_tracking_uri(uri)
    return pid


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    from rich.console import Console

    from pipeline.cluster.runtime import init_ray
    from pipeline.config.presets import load_config
    from pipeline.data.datasets import load_splits
    from pipeline.data.teachers import prepare_teacher

    preset = args.preset or (QUICK_PRESET if args.quick else FULL_PRESET)
    base = [*(QUICK_OVERRIDES if args.quick else FULL_OVERRIDES), *args.overrides]
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"compare-{preset}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(preset, base)
    console = Console(highlight=False)
    started = time.monotonic()
    init_ray(cfg)
    splits = load_splits(cfg)
    teacher_dir = Path(args.teacher).resolve() if args.teacher else out / "teacher"
    if not (teacher_dir / "weights.pt").is_file():
        console.print(f"[bold]teacher[/]: training {cfg.teacher.arch} into {teacher_dir}")
        prepare_teacher(cfg, splits, teacher_dir, progress=True)

    methods = [m for m in METHODS if m in args.methods.split(",")]
    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        result_file = out / method / "result.json"
        if result_file.is_file() and not args.fresh:
            results[method] = json.loads(result_file.read_text())
            console.print(f"[bold]{method}[/]: reusing {result_file}")
            continue
        if (out / method).exists():
            import shutil

            shutil.rmtree(out / method)
        mcfg = method_config(base, preset, method, teacher_dir, out)
        targets = None
        if method in BUDGETED:  # the N2N student's size, and 10x / 20x (baseline.compression)
            teacher_params = json.loads((teacher_dir / "metrics.json").read_text())["params"]
            targets = mcfg.baseline.targets(teacher_params)
            n2n = results.get("n2n-ppo")
            if n2n is not None:
                best = next(r for r in n2n["records"] if r.get("best"))
                targets = sorted({best["params"], *targets}, reverse=True)
        console.rule(method)
        results[method] = run_method(method, mcfg, splits, targets)
        result_file.write_text(json.dumps(results[method], indent=2, default=str) + "\n")

    teacher = next(iter(results.values()))["teacher"] if results else {}
    rows = table_rows(results, teacher)
    (out / "table.md").write_text(markdown(rows, teacher))
    pareto_figure(rows, teacher).savefig(out / "pareto.png")
    doc = {
        "preset": preset, "overrides": base, "machine": machine(), "teacher": teacher,
        "rows": rows, "methods": {m: {k: v for k, v in r.items() if k != "records"}
                                  for m, r in results.items()},
        "wall_time_s": round(time.monotonic() - started, 1),
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    run_id = log_mlflow(args, out, results, rows, doc)
    console.print((out / "table.md").read_text())
    console.print(f"results in {out}; MLflow parent run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
