"""Head to head on one teacher, over seeds: N2N aimed at a budget against the classic methods.

Every method starts from the same trained teacher (its split fixed by ``data.split_seed``),
scores on the same validation split, ends with the same fine-tuning recipe and is tested once
on the same test split, at the same parameter budgets (teacher/10 and teacher/20 by default):

- ``n2n-ppo`` (``n2n-appo``): ``n2n run --compression X`` with RLlib PPO (APPO), one search per
  budget and seed: the search aims at the budget and picks its student within it;
- ``random``: random search with the same child budget, per budget and seed;
- ``n2n-ppo-sparse``: ``n2n-ppo`` from Network Slimming's start: the search runs on the teacher
  after slimming's sparsity phase (``baseline.sparsity_steps`` and ``sparsity_l1``) and keeps
  channels by BatchNorm scale (not in the default set);
- ``n2n-ppo-fit``: ``n2n-ppo`` with ``removal.fit_budget``: each removal child is shrunk
  uniformly to the budget, so removal is scored at it (not in the default set);
- ``slimming``, ``structured-l1``, ``kd-student``: both budgets in one run per seed;
- ``slimming-eq``, ``structured-l1-eq``: the same, with the fine-tuning stretched so that the
  method trains as many KD steps in all as the search did (the equal-cost row);
- ``l1-unstructured``: magnitude pruning at the budgets' sparsity (not dense: shown apart).

Seeds change the data order, the policy and the children's training; the teacher is fixed.
Each (method, seed[, budget]) cell keeps its ``result.json`` and is not run again (``--fresh``
reruns), so an interrupted benchmark continues where it stopped. For the Fashion-MNIST preset
the teacher and every cell's ``result.json`` are kept in git (see ``.gitignore``): the full
comparison takes longer than one working session, and it continues in the next.
``--methods`` and ``--seeds`` choose the cells that run; the table always covers every
finished cell in ``--out``, so one more method run beside a finished comparison joins it.

Usage::

    .venv/bin/python benchmarks/compare.py --seeds 3    # trains its teacher into --out first
    .venv/bin/python benchmarks/compare.py --quick      # digits, minutes (used by a test)

Outputs in ``--out``: ``table.md`` (mean ± std over seeds, the test set's standard error, the
training cost, and each search's margin over each rival in standard errors of the difference), ``results.json`` (every record, the machine, the settings), ``pareto.png``
(test accuracy against parameters) and ``curves.png`` (per stage, the best search reward and
each iteration's mean reward against children evaluated, PPO against random search, per budget
and seed), all logged to MLflow as one parent run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEARCHES = ("n2n-ppo", "n2n-appo", "random", "n2n-ppo-sparse", "n2n-ppo-fit")
CLASSIC = ("slimming", "structured-l1", "kd-student", "l1-unstructured")
EQUAL_COST = ("slimming-eq", "structured-l1-eq")
METHODS = (*SEARCHES, *CLASSIC, *EQUAL_COST)
# What the search must beat at each budget (the list): the margins name these.
RIVALS = ("random", "slimming", "structured-l1", "kd-student", "slimming-eq", "structured-l1-eq")
# The targets: points below the teacher a search's mean may lose at teacher/X, and the
# minutes one search (both stages and fine-tuning) may take.
WITHIN_POINTS = {10.0: 0.5, 20.0: 1.0}
SEARCH_MINUTES = 30
DEFAULT_METHODS = ("n2n-ppo", "random", "slimming", "structured-l1", "kd-student",
                   "l1-unstructured", "slimming-eq", "structured-l1-eq")  # fmt: skip
FULL_PRESET, QUICK_PRESET = "fashion-mnist-resnet18", "demo"
QUICK_OVERRIDES = [
    "teacher.epochs=6", "distill.steps=40", "finetune.steps=120", "finetune.top_k=1",
    "removal.iterations=2", "removal.episodes_per_iteration=3",
    "shrinkage.iterations=2", "shrinkage.episodes_per_iteration=3",
    "baseline.sparsity_steps=20", "baseline.round_steps=20",
]  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="digits and tiny budgets (minutes)")
    p.add_argument("--preset", help=f"preset to compare on (default {FULL_PRESET})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma-separated subset to run (the table shows every finished cell)",
    )
    p.add_argument("--seeds", type=int, default=1, help="seeds per method (0, 1, ...)")
    p.add_argument("--single-seed", default="l1-unstructured,slimming-eq,structured-l1-eq",
                   help="methods run at seed 0 only (marked so in the table)")  # fmt: skip
    p.add_argument("--budgets", default="10,20", help="compression factors, teacher/X params")
    p.add_argument("--teacher", help="teacher checkpoint folder; default trains one into --out")
    p.add_argument("--out", help="output folder (default benchmarks/results/compare-<preset>)")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default sqlite in --out)")
    p.add_argument("--experiment", default="n2n-compare", help="MLflow experiment")
    p.add_argument("--fresh", action="store_true", help="rerun cells that already have results")
    p.add_argument("--report", action="store_true",
                   help="only build the table and plots from the cells finished so far (no "
                        "training, no Ray, no MLflow): for a comparison that spans sessions")  # fmt: skip
    args = p.parse_args(argv)
    unknown = sorted(set(args.methods.split(",")) - set(METHODS))
    if unknown:
        p.error(f"--methods {','.join(unknown)} unknown; choose from {','.join(METHODS)}")
    if args.seeds < 1:
        p.error(f"--seeds {args.seeds} must be at least 1")
    if args.report and args.fresh:
        p.error("--report reads finished cells and --fresh reruns them; pass one of the two")
    return args


# --------------------------------------------------------------------------- one cell


def cell_config(base: list[str], preset: str, method: str, seed: int, teacher: Path,
                folder: Path, extra: list[str]) -> Any:  # fmt: skip
    """The run config of one cell: the shared settings, its seed and folder, no MLflow."""
    from pipeline.config.presets import load_config

    algo = {"n2n-appo": "appo", "random": "random"}.get(method, "ppo")
    if method.endswith("-sparse"):
        slim = load_config(preset, base).baseline
        extra = [f"search.sparsity_steps={slim.sparsity_steps}",
                 f"search.sparsity_l1={slim.sparsity_l1}", "shrinkage.importance=bn", *extra]  # fmt: skip
    if method.endswith("-fit"):
        extra = ["removal.fit_budget=true", *extra]
    cfg = load_config(preset, [
        *base, f"teacher.checkpoint={teacher}", f"output.run_dir={folder}", f"seed={seed}",
        "data.split_seed=0", "tracking.enabled=false", f"search.algo={algo}",
        f"name=compare-{method}-s{seed}", *extra,
    ])  # fmt: skip
    return cfg.resolve_paths()


def run_cell(method: str, cfg: Any, splits: Any, targets: list[int] | None) -> dict[str, Any]:
    """Runs one cell; returns its records, cost and wall time."""
    from rich.console import Console

    from pipeline.baselines.run import run_baseline, with_records
    from pipeline.config.errors import NoFeasibleStudent
    from pipeline.job.run import run

    console = Console(highlight=False)
    started = time.monotonic()
    if method in SEARCHES:
        try:
            summary = with_records(run(cfg, console=console, splits=splits), method)
        except NoFeasibleStudent as err:  # recorded as the cell's failure, the others go on
            from pipeline.tracking.rundir import RunDir

            summary = {**RunDir(cfg.output.run_dir).summary(), "child_evaluations": 0,  # its cost too
                       "records": [{"method": method, "label": "none", "error": str(err)}]}  # fmt: skip
    else:
        summary = run_baseline(cfg, method.removesuffix("-eq"), console=console, splits=splits,
                               targets=targets)  # fmt: skip
    return {
        "method": method, "seed": cfg.seed, "records": summary["records"],
        "cost": summary.get("cost", {}), "child_evaluations": summary["child_evaluations"],
        "wall_time_s": round(time.monotonic() - started, 1), "teacher": summary["teacher"],
        "budget": summary.get("budget"),
    }  # fmt: skip


# --------------------------------------------------------------------------- the table


def rows_of(results: list[dict[str, Any]], teacher: dict[str, Any], budgets: list[int]) -> list:
    """One row per (method, budget, seed): the student a method offers at that budget."""
    rows = []
    for result in results:
        records = [r for r in result["records"] if not r.get("error")]
        for budget in budgets:
            if result.get("budget_target") not in (None, budget):
                continue
            if result["method"] in SEARCHES:
                mine = [r for r in records if r.get("best")]
            elif result["method"] == "l1-unstructured":
                mine = [min((r for r in records if r["nonzero_params"] <= budget),
                            key=lambda r: abs(r["nonzero_params"] - budget), default=None)]  # fmt: skip
            else:
                mine = [r for r in records if r.get("target_params") == budget]
            for r in [r for r in mine if r is not None]:
                rows.append({
                    "method": result["method"], "seed": result["seed"], "budget": budget,
                    "params": r["params"], "nonzero_params": r["nonzero_params"],
                    "flops": r["flops"], "val_accuracy": r["val_accuracy"],
                    "test_accuracy": r["test_accuracy"],
                    "delta_points": 100 * (r["test_accuracy"] - teacher["test_accuracy"]),
                    "within": (r["nonzero_params"] if result["method"] == "l1-unstructured"
                               else r["params"]) <= budget,
                    "kd_steps": result["cost"].get("kd_steps"),
                    "teacher_forwards": result["cost"].get("teacher_forwards"),
                    "wall_time_s": result["wall_time_s"],
                })  # fmt: skip
        for r in result["records"]:
            if r.get("error"):
                rows.append({"method": result["method"], "seed": result["seed"],
                             "error": r["error"]})  # fmt: skip
    return rows


def summarise(rows: list[dict[str, Any]], n_test: int) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds per (method, budget), with the test set's
    standard error at the mean accuracy."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        if not r.get("error"):
            groups.setdefault((r["method"], r["budget"]), []).append(r)
    out = []
    for (method, budget), rs in groups.items():
        acc = [r["test_accuracy"] for r in rs]
        mean = statistics.fmean(acc)
        out.append({
            "method": method, "budget": budget, "seeds": len(rs),
            "params": statistics.fmean(r["params"] for r in rs),
            "nonzero_params": statistics.fmean(r["nonzero_params"] for r in rs),
            "within": all(r["within"] for r in rs),
            "test_mean": mean, "test_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "delta_mean": statistics.fmean(r["delta_points"] for r in rs),
            "test_se": math.sqrt(mean * (1 - mean) / n_test),
            "kd_steps": statistics.fmean(r["kd_steps"] or 0 for r in rs),
            "teacher_forwards": statistics.fmean(r["teacher_forwards"] or 0 for r in rs),
            "wall_time_s": statistics.fmean(r["wall_time_s"] for r in rs),
        })  # fmt: skip
    return sorted(out, key=lambda s: (-s["budget"], -s["test_mean"]))


def margins(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each N2N search's mean test accuracy against each rival's (``RIVALS``) at each budget:
    the difference in points and in standard errors of that difference over seeds (Welch's;
    None when either side ran one seed). The test split is shared, so its own sampling error
    (the table's note) moves both sides alike and is not in it."""
    by = {(s["method"], s["budget"]): s for s in summary}
    out = []
    for (method, budget), s in by.items():
        if not method.startswith("n2n-"):
            continue
        for rival in RIVALS:
            r = by.get((rival, budget))
            if r is None:
                continue
            points = 100 * (s["test_mean"] - r["test_mean"])
            se = (100 * math.sqrt(s["test_std"] ** 2 / s["seeds"] + r["test_std"] ** 2 / r["seeds"])
                  if min(s["seeds"], r["seeds"]) > 1 else None)  # fmt: skip
            out.append({"method": method, "budget": budget, "rival": rival, "points": points,
                        "se": se, "standard_errors": points / se if se else None})  # fmt: skip
    return out


def standard_errors(margin: dict[str, Any]) -> str:
    """A margin in standard errors of the difference, or why it has none."""
    if margin["se"] is None:
        return "one seed"
    return f"{margin['standard_errors']:+.1f} SE" if margin["se"] > 0 else "no spread"


def margin_lines(rows: list[dict[str, Any]]) -> str:
    """The margins as one sentence per search and budget."""
    groups: dict[tuple[str, int], list[str]] = {}
    for m in rows:
        groups.setdefault((m["method"], m["budget"]), []).append(
            f"{m['rival']} {m['points']:+.2f} points ({standard_errors(m)})"
        )
    return "".join(f"\n{method} at <= {budget:,} against {'; '.join(parts)}.\n"
                   for (method, budget), parts in groups.items())  # fmt: skip


def targets(
    rows: list[dict[str, Any]], summary: list[dict[str, Any]], factors: dict[int, float]
) -> list[dict[str, Any]]:
    """Each N2N search against the targets at each budget (``factors`` maps a budget to its
    teacher/X): its mean within ``WITHIN_POINTS`` of the teacher, its mean above every
    rival's mean that ran (the hardest rival: the smallest margin), and its slowest seed
    within ``SEARCH_MINUTES``."""
    by_margin: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for m in margins(summary):
        by_margin.setdefault((m["method"], m["budget"]), []).append(m)
    out = []
    for s in summary:
        method, budget = s["method"], s["budget"]
        if not method.startswith("n2n-"):
            continue
        limit = WITHIN_POINTS.get(factors.get(budget, 0.0))
        hardest = min(by_margin.get((method, budget), []), key=lambda m: m["points"], default=None)
        slowest = max(r["wall_time_s"] for r in rows if not r.get("error")
                      and (r["method"], r["budget"]) == (method, budget)) / 60  # fmt: skip
        out.append({
            "method": method, "budget": budget, "factor": factors.get(budget),
            "seeds": s["seeds"], "delta": s["delta_mean"], "within_points": limit,
            "within_met": None if limit is None else s["delta_mean"] >= -limit,
            "hardest_rival": hardest,
            "ahead_met": None if hardest is None else hardest["points"] > 0,
            "slowest_min": slowest, "time_met": slowest <= SEARCH_MINUTES,
        })  # fmt: skip
    return out


def target_lines(rows: list[dict[str, Any]]) -> str:
    """The targets as one sentence per search and budget, each beside its measurement."""

    def verdict(met: bool | None) -> str:
        return "not measured" if met is None else "met" if met else "missed"

    lines = []
    for t in rows:
        parts = []
        if t["within_points"] is not None:
            parts.append(f"mean within {t['within_points']:.1f} points of the teacher: "
                         f"{t['delta']:+.2f}, {verdict(t['within_met'])}")  # fmt: skip
        c = t["hardest_rival"]
        if c is not None:
            parts.append(f"mean above every rival's: hardest {c['rival']} {c['points']:+.2f} "
                         f"points ({standard_errors(c)}), {verdict(t['ahead_met'])}")  # fmt: skip
        parts.append(f"each search <= {SEARCH_MINUTES} min: slowest {t['slowest_min']:.1f} "
                     f"min, {verdict(t['time_met'])}")  # fmt: skip
        where = f"teacher/{t['factor']:g}" if t["factor"] else f"<= {t['budget']:,}"
        lines.append(f"\nTargets, {t['method']} at {where} ({t['seeds']} seeds): "
                     + "; ".join(parts) + ".\n")  # fmt: skip
    return "".join(lines)


def markdown(summary: list[dict[str, Any]], teacher: dict[str, Any]) -> str:
    head = ("| budget | method | seeds | params | test acc (mean ± std) | delta (pts) | "
            "KD steps | teacher fwd | wall time |\n"
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")  # fmt: skip
    lines = [f"| - | teacher ({teacher['arch']}) | - | {teacher['params']:,} | "
             f"{teacher['test_accuracy']:.2%} | 0.00 | - | - | - |"]  # fmt: skip
    for s in summary:
        params = f"{s['params']:,.0f}"
        if s["nonzero_params"] < s["params"]:
            params += f" ({s['nonzero_params']:,.0f} non-zero)"
        note = "" if s["within"] else " (over budget)"
        lines.append(
            f"| <= {s['budget']:,} | {s['method']}{note} | {s['seeds']} | {params} | "
            f"{s['test_mean']:.2%} ± {100 * s['test_std']:.2f} | {s['delta_mean']:+.2f} | "
            f"{s['kd_steps']:,.0f} | {s['teacher_forwards']:,.0f} | "
            f"{s['wall_time_s'] / 60:.1f} min |"
        )
    se = summary[0]["test_se"] if summary else float("nan")
    note = f"The test set's standard error at these accuracies is about {100 * se:.2f} points."
    return "\n".join([head.rstrip("\n"), *lines, "", note, ""]) + margin_lines(margins(summary))


def pareto_figure(summary: list[dict[str, Any]], teacher: dict[str, Any]) -> Any:
    """Mean test accuracy (± std over seeds) against parameters, per method and budget."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=120)
    ax = fig.add_subplot()
    for i, method in enumerate(METHODS):
        mine = sorted((s for s in summary if s["method"] == method), key=lambda s: s["params"])
        if not mine:
            continue
        sparse = method == "l1-unstructured"
        xs = [s["nonzero_params" if sparse else "params"] for s in mine]
        ax.errorbar(xs, [100 * s["test_mean"] for s in mine],
                    yerr=[100 * s["test_std"] for s in mine], marker="o^vsDPXh"[i % 8],
                    capsize=3, label=method + (" (non-zero params)" if sparse else ""))  # fmt: skip
    ax.scatter([teacher["params"]], [100 * teacher["test_accuracy"]], marker="*", s=220,
               color="gold", edgecolor="black", zorder=4, label="teacher")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title("At the same budgets, on one teacher, same fine-tuning")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


STAGES = ("removal", "shrinkage")


def learning(run_dir: Path) -> dict[str, dict[str, list]]:
    """A search's learning curves per stage, from its run folder: the best reward after each
    child of the stage, and the mean reward of each iteration's children at the number of the
    stage's children evaluated by its end (a failed child counts -1, as in the search). The
    stages' rewards live on different scales (under a budget no removal child fits, so removal
    rewards are negative), hence one curve each. Empty where the folder is gone."""
    from pipeline.tracking.rundir import RunDir

    rows = RunDir(run_dir).children() if (run_dir / "children.csv").is_file() else []
    out = {}
    for stage in STAGES:
        best, curve, groups = -math.inf, [], {}
        for n, row in enumerate((r for r in rows if r["stage"] == stage), 1):
            reward = -1.0 if row.get("error") else float(row["reward"])
            best = max(best, reward)
            curve.append(best)
            groups.setdefault((row["trial"], int(row["iteration"])), []).append((n, reward))
        means = [(max(n for n, _ in g), statistics.fmean(r for _, r in g)) for g in groups.values()]
        if curve:
            out[stage] = {"best": curve, "iteration_means": sorted(means)}
    return out


def curves_figure(curves: dict[str, list[dict[str, Any]]]) -> Any:
    """Per search and budget, one line per seed, one row per stage: the best reward found after
    each child (left) and the mean reward of each iteration's children (right), against the
    stage's children evaluated."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 8), dpi=120)
    axes = fig.subplots(len(STAGES), 2, squeeze=False)
    # One colour per method, one line style per budget: PPO and random at a budget sit side
    # by side in the same style.
    methods = sorted({label.split(" (")[0] for label in curves})
    budgets = sorted({label.split(" (")[1] for label in curves},
                     key=lambda b: -int("".join(filter(str.isdigit, b))))  # fmt: skip
    for label, runs in sorted(curves.items()):
        method, budget = label.split(" (")
        color, style = f"C{methods.index(method)}", ("-", "--", ":")[budgets.index(budget) % 3]
        for i, run in enumerate(runs):
            for (best_ax, mean_ax), stage in zip(axes, STAGES, strict=True):
                if stage not in run.get("stages", {}):
                    continue
                curve, name = run["stages"][stage], label if i == 0 else None
                best_ax.plot(range(1, len(curve["best"]) + 1), curve["best"], color=color,
                             linestyle=style, alpha=0.8, label=name)  # fmt: skip
                xs, ys = zip(*curve["iteration_means"], strict=True)
                mean_ax.plot(xs, ys, color=color, linestyle=style, alpha=0.8, marker=".",
                             label=name)  # fmt: skip
    for (best_ax, mean_ax), stage in zip(axes, STAGES, strict=True):
        best_ax.set_ylabel(f"{stage}: best reward so far")
        mean_ax.set_ylabel(f"{stage}: mean reward per iteration")
        for ax in (best_ax, mean_ax):
            ax.set_xlabel(f"{stage} children evaluated")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def machine() -> dict[str, Any]:
    import torch

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
         if ln.startswith("model name")), platform.processor(),
    ) if Path("/proc/cpuinfo").is_file() else platform.processor()  # fmt: skip
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                            "envs", "pipeline", "configs", "benchmarks/compare.py"],
                           cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "gpu": torch.cuda.is_available(),
        "torch": torch.__version__,
        "commit": commit + ("+changes" if dirty else ""),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def log_mlflow(args: argparse.Namespace, out: Path, doc: dict[str, Any]) -> str:
    """One parent run with the table, plots and results; a nested run per (method, budget)."""
    from pipeline.tracking.tracker import Tracker

    uri = args.tracking_uri or f"sqlite:///{out / 'mlflow.db'}"
    tracker = Tracker(uri, args.experiment)
    tracker.check_reachable()
    client = tracker.client
    parent = client.create_run(tracker.experiment_id, run_name=out.name,
                               tags={"n2n.benchmark": "compare", "n2n.preset": doc["preset"]})  # fmt: skip
    pid = parent.info.run_id
    client.log_dict(pid, doc, "results.json")
    for name in ("table.md", "pareto.png", "curves.png"):
        if (out / name).is_file():
            client.log_artifact(pid, str(out / name))
    for s in doc["summary"]:
        run = client.create_run(
            tracker.experiment_id, run_name=f"{s['method']} <= {s['budget']}",
            tags={"mlflow.parentRunId": pid, "n2n.method": s["method"], "n2n.budget": str(s["budget"])},
        )  # fmt: skip
        for key in ("test_mean", "test_std", "delta_mean", "params", "kd_steps", "wall_time_s"):
            client.log_metric(run.info.run_id, key, float(s[key]))
        client.set_terminated(run.info.run_id, "FINISHED")
    client.set_terminated(pid, "FINISHED")
    return pid


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for key, value in (("RAY_USAGE_STATS_ENABLED", "0"), ("MLFLOW_DISABLE_TELEMETRY", "true"),
                       ("RAY_AIR_NEW_OUTPUT", "0"),
                       ("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")):  # fmt: skip
        os.environ.setdefault(key, value)
    from rich.console import Console

    from pipeline.cluster.runtime import init_ray
    from pipeline.config.presets import load_config
    from pipeline.data.datasets import load_splits
    from pipeline.data.teachers import prepare_teacher
    from pipeline.tracking.rundir import RunDir

    preset = args.preset or (QUICK_PRESET if args.quick else FULL_PRESET)
    base = [*(QUICK_OVERRIDES if args.quick else []), *args.overrides]
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"compare-{preset}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(preset, [*base, "data.split_seed=0"])
    console = Console(highlight=False)
    started = time.monotonic()
    teacher_dir = Path(args.teacher).resolve() if args.teacher else out / "teacher"
    if args.report and not (teacher_dir / "metrics.json").is_file():
        console.print(f"--report: no teacher in {teacher_dir}; run the comparison first")
        return 2
    splits = None
    if not args.report:
        init_ray(cfg)
        splits = load_splits(cfg)
    if not args.report and not (teacher_dir / "weights.pt").is_file():
        console.print(f"[bold]teacher[/]: training {cfg.teacher.arch} into {teacher_dir}")
        prepare_teacher(cfg, splits, teacher_dir, progress=True)
    teacher_params = json.loads((teacher_dir / "metrics.json").read_text())["params"]
    factors = [float(f) for f in args.budgets.split(",")]
    budgets = [int(teacher_params / f) for f in factors]
    single = set(args.single_seed.split(","))
    chosen = set(args.methods.split(","))

    # --methods and --seeds choose what runs; the table covers every finished cell in --out,
    # so running one more method beside a finished comparison adds its rows to the table.
    results: list[dict[str, Any]] = []
    missing: list[str] = []
    curves: dict[str, list[dict[str, Any]]] = {}
    for method in METHODS:
        selected = method in chosen
        seeds = range(1 if method in single else args.seeds) if selected else finished(out, method)
        for seed in seeds:
            cells = ([(f"{method}/x{f:g}/s{seed}", [f"budget.compression={f}"], b)
                      for f, b in zip(factors, budgets, strict=True)]
                     if method in SEARCHES else [(f"{method}/s{seed}", [], None)])  # fmt: skip
            for name, extra, budget in cells:
                folder = out / name
                result_file = folder / "result.json"
                if result_file.is_file() and not (args.fresh and selected):
                    result = json.loads(result_file.read_text())
                elif not selected:
                    continue
                elif args.report:
                    missing.append(name)
                    continue
                else:
                    shutil.rmtree(folder, ignore_errors=True)
                    extra = [*extra, *equal_cost(method, out, seed, factors)]
                    if method == "l1-unstructured":
                        extra.append(f"baseline.amounts={sparsities(teacher_dir, budgets)}")
                    console.rule(name)
                    ccfg = cell_config(base, preset, method, seed, teacher_dir, folder / "run",
                                       extra)  # fmt: skip
                    result = run_cell(method, ccfg, splits, None if budget else budgets)
                    result["budget_target"] = budget
                    # A benchmark may span sessions: each cell says where and at which commit.
                    result["machine"] = machine()
                    if method in SEARCHES:
                        result["curve"] = RunDir(folder / "run").best_curve()
                    folder.mkdir(parents=True, exist_ok=True)
                    result_file.write_text(json.dumps(result, indent=2, default=str) + "\n")
                results.append(result)
                if method in SEARCHES:
                    # The whole search's best-so-far is kept in result.json, so never lost.
                    curve = {"best": result["curve"], "stages": learning(folder / "run")}
                    curves.setdefault(f"{method} (<= {budget:,})", []).append(curve)

    if args.report and not results:
        console.print(f"--report: no finished cell in {out} yet")
        return 2
    teacher = results[0]["teacher"] if results else {}
    rows = rows_of(results, teacher, budgets)
    n_test = (len(splits.test[1]) if splits is not None
              else json.loads((teacher_dir / "metrics.json").read_text())["dataset"]["test"])  # fmt: skip
    summary = summarise(rows, n_test)
    partial = (f"\nPartial: {len(missing)} of {len(missing) + len(results)} cells not run "
               f"yet ({', '.join(missing)}).\n" if missing else "")  # fmt: skip
    goals = targets(rows, summary, dict(zip(budgets, factors, strict=True)))
    (out / "table.md").write_text(markdown(summary, teacher) + target_lines(goals) + partial)
    pareto_figure(summary, teacher).savefig(out / "pareto.png")
    if curves:
        curves_figure(curves).savefig(out / "curves.png")
    doc = {"preset": preset, "overrides": base, "budgets": budgets, "seeds": args.seeds,
           "machine": machine(), "teacher": teacher, "rows": rows, "summary": summary,
           "margins": margins(summary), "targets": goals, "curves": curves, "missing": missing,
           "wall_time_s": round(time.monotonic() - started, 1)}  # fmt: skip
    (out / "results.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    console.print((out / "table.md").read_text())
    if args.report:
        console.print(f"results in {out} (not logged to MLflow: --report)")
        return 0
    run_id = log_mlflow(args, out, doc)
    console.print(f"results in {out}; MLflow parent run {run_id}")
    return 0


def finished(out: Path, method: str) -> list[int]:
    """The seeds of ``method`` with at least one finished cell in ``out``."""
    cells = [*(out / method).glob("s*/result.json"), *(out / method).glob("x*/s*/result.json")]
    return sorted({int(f.parent.name[1:]) for f in cells if f.parent.name[1:].isdigit()})


def sparsities(teacher_dir: Path, budgets: list[int]) -> list[float]:
    """The global sparsity of conv/linear weights that leaves at most each budget of non-zero
    parameters: biases and BatchNorm parameters are not pruned, so a plain ``1 - 1/X`` would
    leave a few hundred too many."""
    import math

    from envs.checkpoint import load_checkpoint
    from pipeline.baselines.unstructured import PRUNABLE

    model = load_checkpoint(teacher_dir).model
    prunable = sum(m.weight.numel() for m in model.modules() if isinstance(m, PRUNABLE))
    fixed = sum(p.numel() for p in model.parameters()) - prunable
    return [math.ceil(1e4 * (1 - (b - fixed) / prunable)) / 1e4 for b in budgets]


def equal_cost(method: str, out: Path, seed: int, factors: list[float]) -> list[str]:
    """For an ``-eq`` method: each student's fine-tuning stretched to the KD steps one N2N (PPO)
    search of this seed trained in all (children, sparsity phase and students; the mean over
    the budgets), so the classic method trains at least as much per student as the search."""
    if not method.endswith("-eq"):
        return []
    steps = []
    for f in factors:
        result = out / f"n2n-ppo/x{f:g}/s{seed}/result.json"
        if not result.is_file():
            raise SystemExit(f"{method} needs n2n-ppo's results first ({result}); run it before")
        steps.append(json.loads(result.read_text())["cost"]["kd_steps"])
    return [f"finetune.steps={int(statistics.fmean(steps))}"]


if __name__ == "__main__":
    sys.exit(main())
