"""How the search scales, by simulation: N logical Ray nodes on this machine, the real search
machinery, children that sleep instead of training.

A Ray cluster of N worker nodes (``ray.cluster_utils.Cluster``, ``--slots`` CPUs and fake GPUs
each) and a head with no CPU (as the chart's) runs the real search: a Tune trial of RLlib PPO
with one env runner per child in flight, the KD evaluator's Ray tasks with their
Fashion-MNIST data and teacher-logit payload in the object store, the reward cache and child
log actors, the run directory and MLflow (a local SQLite store). Only the KD training inside
each child's task is replaced by a sleep and a synthetic accuracy
(:class:`SleepEvaluator`). One search per cluster size runs ``--iterations`` iterations of
children of each of the ``--seconds`` durations in turn (phases), so the cluster, the env
runners and the payload start once per size; each phase is one point. For each (nodes, child
duration) it measures:

- children per second against the ideal ``nodes * slots / duration``;
- the per-child overhead of the path, submit -> result -> recorded (a child's wall time as
  the env saw it, less its sleep);
- head memory (driver, child log and reward cache actors, resident set) and the bytes each
  child's task carries through the object store, per recorded child;
- on how many nodes the data and teacher logits live at the end (once per node is the goal);
- where time goes at the largest N: Ray's timeline (actor methods, tasks) and a profile of
  the driver.

Usage::

    .venv/bin/python benchmarks/scale.py                 # the sweep (see --nodes, --seconds)
    .venv/bin/python benchmarks/scale.py --quick         # 2 nodes, a few dozen children (a test)
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import json
import os
import pstats
import statistics
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

from envs.evaluation import Child, ChildResult  # noqa: E402
from pipeline.children.evaluator import KDEvaluator  # noqa: E402

EVALUATOR = "benchmarks.scale:SleepEvaluator"


@ray.remote(max_retries=0)
def sleep_child(payload: dict[str, Any], params: int, seconds: float) -> ChildResult:
    """A child task that holds the real payload (fetched to its node like a real child's)
    and sleeps instead of training; its accuracy is a smooth function of its size."""
    started = time.time()
    assert payload["teacher_logits"].shape[0] == payload["train_x"].shape[0]
    time.sleep(seconds)
    return ChildResult(
        accuracy=0.95 - 0.2 / (1 + params / 20_000),
        wall_time_s=time.time() - started,
        extra={
            "node": ray.get_runtime_context().get_node_id(),
            "task_start": started,
            "task_end": time.time(),
        },  # fmt: skip
    )


PAYLOADS: list[Any] = []
"""The payload references the driver's evaluator made (kept to find their copies after)."""


class SleepEvaluator(KDEvaluator):
    """:class:`KDEvaluator` whose child task sleeps instead of training: ``child_seconds``, or
    its list in phases of ``phase_children`` children per env runner (each runner evaluates
    one child per iteration, so a phase is that many iterations)."""

    def __init__(self, child_seconds: float | list[float] = 0.5, phase_children: int = 0,
                 record_to: str | None = None, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(**kwargs)
        seconds = child_seconds if isinstance(child_seconds, list) else [child_seconds]
        self.child_seconds = [float(x) for x in seconds]
        self.phase_children = int(phase_children)
        self.record_to = record_to
        self._submitted = 0

    def _seconds(self) -> float:
        phase = self._submitted // self.phase_children if self.phase_children else 0
        return self.child_seconds[min(phase, len(self.child_seconds) - 1)]

    def prepare(self) -> SleepEvaluator:
        fresh = not self.prepared
        super().prepare()
        if fresh and isinstance(self.payload, ray.ObjectRef):
            PAYLOADS.append(self.payload)
        return self

    def config(self) -> dict[str, Any]:
        return {**super().config(), "child_seconds": self.child_seconds,
                "phase_children": self.phase_children, "record_to": self.record_to}  # fmt: skip

    def evaluate_many(self, children: list[Child]) -> list[ChildResult]:
        """Times the whole path (cache look-up, submit, wait, result) for the benchmark; a
        call answered from the cache alone trained nothing and is not a child's path."""
        started = time.perf_counter()
        results = super().evaluate_many(children)
        if self.record_to and not all(r.cache_hit for r in results):
            path = Path(self.record_to) / f"paths-{os.getpid()}.txt"
            with path.open("a") as fh:
                fh.write(f"{time.perf_counter() - started:.6f}\n")
        return results

    def _key(self, child: Child) -> str:
        """Every child a cache miss: the cache actor is consulted and written for each child as
        in a real search, but a policy that converges onto a few architectures would otherwise
        be served from the cache, and throughput would measure the policy, not the machinery."""
        return f"{super()._key(child)}-{uuid.uuid4().hex}"

    def _submit(self, child: Child, cache: Any) -> Any:
        seconds = self._seconds()
        self._submitted += 1
        return sleep_child.options(
            num_cpus=self.num_cpus, num_gpus=self.num_gpus, scheduling_strategy="DEFAULT",
        ).remote(self.payload, child.params, seconds)  # fmt: skip


# --------------------------------------------------------------------------- one point


def rss(pid: int) -> int:
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def head_processes() -> dict[str, int]:
    """PIDs of the driver and the run's actors on the head (child log, reward cache)."""
    from pipeline.children.cache import DEFAULT_CACHE_NAME
    from pipeline.search.records import LOG_NAMESPACE

    pids = {"driver": os.getpid()}
    for info in ray.util.list_named_actors(all_namespaces=True):
        name, namespace = info["name"], info["namespace"]
        kind = ("ChildLog" if name.startswith("children-") and namespace == LOG_NAMESPACE
                else "RewardCache" if name.startswith(DEFAULT_CACHE_NAME) else None)  # fmt: skip
        if kind:
            actor = ray.get_actor(name, namespace=namespace)
            pids[kind] = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    return pids


def actor_memory() -> dict[str, dict[str, float]]:
    """Processes per actor class alive now (env runners, the trial, the run's actors) and
    their mean resident set: what the head holds per child in flight."""
    from ray.util.state import list_actors

    by_class: dict[str, list[int]] = defaultdict(list)
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000):
        if actor.pid:
            by_class[actor.class_name].append(rss(actor.pid))
    return {name: {"count": len(v), "mean_mb": round(statistics.fmean(v) / 2**20, 1)}
            for name, v in sorted(by_class.items())}  # fmt: skip


def one_cluster(nodes: int, slots: int, durations: list[float], iterations: int, out: Path,
                teacher: Path, profile: bool) -> list[dict[str, Any]]:  # fmt: skip
    """Runs one search on a fresh cluster of ``nodes`` worker nodes, ``iterations`` iterations
    of children of each duration in turn; returns one point of figures per duration."""
    from ray.cluster_utils import Cluster

    from pipeline.config.presets import load_config
    from pipeline.job.run import run
    from pipeline.tracking.rundir import RunDir
    from pipeline.tracking.tracker import tracker_for

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": 400 * 1024**2, "include_dashboard": True,
    })  # fmt: skip
    for _ in range(nodes):
        cluster.add_node(num_cpus=slots, num_gpus=slots, object_store_memory=300 * 1024**2)
    ray.init(address=cluster.address, log_to_driver=False)
    folder = out / f"n{nodes}"
    runners = nodes * slots
    cfg = load_config("fashion-mnist-resnet18", [
        f"teacher.checkpoint={teacher}", f"output.run_dir={folder / 'run'}",
        f"tracking.uri=sqlite:///{out / 'mlflow.db'}", "tracking.experiment=n2n-scale",
        f"name=scale-n{nodes}", "removal.enabled=false",
        f"removal.episodes_per_iteration={runners}",
        f"shrinkage.iterations={iterations * len(durations)}",
        f"shrinkage.episodes_per_iteration={runners}",
        f"search.env_runners={runners}", f"search.evaluator={EVALUATOR}",
        f"search.evaluator_kwargs={{child_seconds: {durations}, phase_children: {iterations}, "
        f"teacher_accuracy: 0.95, record_to: '{folder}'}}",
        "distill.early_stop=false",
        "ray.cpus_per_child=1", "ray.gpus_per_child=1", "finetune.top_k=1",
        "finetune.steps=1", "shrinkage.entropy_coeff=0.05",
    ]).resolve_paths()  # fmt: skip
    # Fine-tuning is not part of the search path: one step keeps its cost out of the figures.
    profiler = cProfile.Profile() if profile else None
    samples: list[tuple[int, dict[str, int]]] = []  # (children recorded, RSS per process)
    marks: dict[str, float] = {}
    pids: dict[str, int] = {}
    actors: dict[str, dict[str, float]] = {}
    retained: list[int] = []  # (children recorded, bytes of the driver's records of them)

    from pipeline.job import run as job_run
    from pipeline.tracking import progress

    init, on_result, top = (progress.StageMonitor.__init__, progress.StageMonitor.on_result,
                            job_run.top_candidates)  # fmt: skip

    def sample(children: int) -> None:
        samples.append((children, {k: rss(pid) for k, pid in pids.items()}))

    def measured_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)  # the search starts: its actors exist, Ray is warm
        pids.update(head_processes())
        marks["search_start"] = time.monotonic()
        sample(0)
        if profiler is not None:
            profiler.enable()

    def measured_result(self: Any, trial: Any, result: dict) -> None:
        on_result(self, trial, result)
        sample(len(self.all_rows))
        kept = [self.rows, self.tracker.children if self.tracker is not None else []]
        retained[:] = [len(self.all_rows), deep_size(kept)]
        if len(samples) == 4:  # once, in steady state: the trial's actors are alive now
            actors.update(actor_memory())

    def search_done(*args: Any, **kwargs: Any) -> Any:
        if "search_end" not in marks:
            marks["search_end"] = time.monotonic()
            if profiler is not None:
                profiler.disable()
        return top(*args, **kwargs)

    progress.StageMonitor.__init__, progress.StageMonitor.on_result = measured_init, measured_result
    job_run.top_candidates = search_done
    started = time.monotonic()
    try:
        with tracker_for(cfg) as tracker:
            summary = run(cfg, tracker=tracker)
    finally:
        progress.StageMonitor.__init__, progress.StageMonitor.on_result = init, on_result
        job_run.top_candidates = top
    timeline = folder / "timeline.json"
    ray.timeline(filename=str(timeline))
    shared = {  # measured once per search, the same for each of its phases
        "nodes": nodes, "slots": slots, "search_s_all": round(
            marks["search_end"] - marks["search_start"], 1),
        "driver_record_bytes_per_child": retained[1] / retained[0] if retained else None,
        "actors": actors, "task_arg_bytes_per_child": child_arg_bytes(cfg),
        "payload_copies": payload_locations(), "summary_children": summary["children"],
        "time_by_name": time_by_name(timeline),
    }  # fmt: skip
    ray.shutdown()
    cluster.shutdown()
    shared["wall_s"] = round(time.monotonic() - started, 1)
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
        (folder / "driver_profile.txt").write_text(text.getvalue())

    run_dir = RunDir(folder / "run")
    # Each env runner's paths, in order: one per iteration, ``iterations`` per phase.
    paths = [[float(x) for x in f.read_text().split()] for f in folder.glob("paths-*.txt")]
    if any(len(r) != iterations * len(durations) for r in paths):
        raise RuntimeError(f"env runners evaluated {[len(r) for r in paths]} children each, "
                           f"not {iterations * len(durations)}: the phases are not aligned")  # fmt: skip
    points = [
        phase_point(shared, durations[k], k, iterations, run_dir, paths, samples)
        for k in range(len(durations))
    ]  # fmt: skip
    (folder / "points.json").write_text(json.dumps(points, indent=2, default=str) + "\n")
    return points


def phase_point(shared: dict[str, Any], seconds: float, k: int, iterations: int,
                run_dir: Any, paths: list[list[float]],
                samples: list[tuple[int, dict[str, int]]]) -> dict[str, Any]:  # fmt: skip
    """The figures of phase ``k`` (children of ``seconds``, iterations ``k * iterations + 1``
    to ``(k + 1) * iterations``) of one search."""
    first, last = k * iterations, (k + 1) * iterations  # iteration indices, 0-based, end open
    rows = [r for r in run_dir.children("shrinkage") if first < int(r["iteration"]) <= last]
    trained = [r for r in rows if not r["cache_hit"] and not r["error"]]
    iters = run_dir.iterations()[first:last]
    ends = [float(r["elapsed_s"]) for r in iters]
    # Trained children only: a cache hit (a repeated architecture) costs no slot.
    counts = [int(r["children_total"]) - int(r["cache_hits"]) for r in iters]
    # Steady state: from the end of the phase's first iteration (env runners started and the
    # payload on the nodes, or the children of the last phase finished) to the end of its last.
    steady = (counts[-1] - counts[0]) / (ends[-1] - ends[0]) if len(iters) > 1 else 0.0
    gaps = [b - a - seconds for a, b in zip(ends, ends[1:], strict=False)]
    # Each env runner's first path carries its start-up (cache actor connection, payload
    # fetch, the first task's worker start): reported apart from the steady per-child cost.
    skip = 1 if k == 0 else 0
    overheads = [p - seconds for r in paths for p in r[first + skip : last]]
    startup = [r[0] - seconds for r in paths if r] if k == 0 else []
    before = float(run_dir.iterations()[first - 1]["elapsed_s"]) if k else 0.0
    phase_samples = samples[first : last + 1]  # sample i is taken after iteration i
    nodes, slots = shared["nodes"], shared["slots"]
    point = {
        **{key: shared[key] for key in ("nodes", "slots")},
        "child_s": seconds, "phase": k, "children": len(rows), "trained": len(trained),
        "cache_hits": sum(bool(r["cache_hit"]) for r in rows),
        "failed": sum(bool(r["error"]) for r in rows),
        "search_s": round(ends[-1] - before, 1) if ends else None,
        "children_per_s": steady,
        "children_per_s_with_startup": len(trained) / (ends[-1] - before) if ends else 0.0,
        "ideal_per_s": nodes * slots / seconds,
        "startup_s": ends[0] if k == 0 and ends else None,
        "overhead_ms_median": 1000 * statistics.median(overheads) if overheads else None,
        "overhead_ms_p90": 1000 * quantile(overheads, 0.9) if overheads else None,
        "first_child_overhead_s_median": statistics.median(startup) if startup else None,
        "iteration_overhead_s_median": statistics.median(gaps) if gaps else None,
        "head_bytes_per_child": growth(phase_samples),
        "head_rss_mb": {name: v / 2**20 for name, v in phase_samples[-1][1].items()}
        if phase_samples else {},
        **{key: v for key, v in shared.items() if key not in ("nodes", "slots")},
    }  # fmt: skip
    point["efficiency"] = point["children_per_s"] / point["ideal_per_s"]
    return point


def growth(samples: list[tuple[int, dict[str, int]]]) -> dict[str, float]:
    """Bytes per recorded child each head process grows by: the least-squares slope of its
    resident set against children recorded, after the first iterations (start-up)."""
    points = samples[2:] if len(samples) > 3 else samples
    out: dict[str, float] = {}
    for key in points[0][1] if points else []:
        xs = [n for n, _ in points]
        ys = [m[key] for _, m in points]
        mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
        var = sum((x - mean_x) ** 2 for x in xs)
        cov = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
        out[key] = cov / var if var else 0.0
    return out


def deep_size(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of Python objects ``obj`` holds (containers followed, shared objects once)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(deep_size(k, seen) + deep_size(v, seen) for k, v in obj.items())
    elif isinstance(obj, list | tuple | set):
        size += sum(deep_size(v, seen) for v in obj)
    return size


def payload_locations() -> int | None:
    """On how many nodes the evaluator's payload (data + teacher logits) has a copy now."""
    payloads = importlib.import_module("benchmarks.scale").PAYLOADS  # the driver's evaluator's
    if not payloads:
        return None
    locations = ray.experimental.get_object_locations(payloads[-1:])
    nodes = len(next(iter(locations.values())).get("node_ids", []))
    payloads.clear()
    return nodes


def child_arg_bytes(cfg: Any) -> int:
    """The bytes one child's task carries besides the payload: its network, pickled."""
    import pickle

    from envs.checkpoint import load_checkpoint
    from envs.surgery import analyze, make_child

    teacher = load_checkpoint(cfg.teacher.checkpoint)
    units = [u.name for u in analyze(teacher.model, [1, 28, 28]).units if u.shrinkable]
    child, _ = make_child(teacher.model, teacher.spec, ratios=dict.fromkeys(units, 0.5))
    return len(pickle.dumps(child))


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def time_by_name(timeline: Path) -> dict[str, dict[str, float]]:
    """Seconds and calls per task or actor method in Ray's timeline (Chrome trace events)."""
    events = json.loads(timeline.read_text())
    total: dict[str, list[float]] = defaultdict(list)
    for event in events:
        if event.get("ph") == "X" and "dur" in event:
            total[event.get("name", "?")].append(event["dur"] / 1e6)
    ranked = sorted(total.items(), key=lambda kv: -sum(kv[1]))[:15]
    return {name: {"seconds": round(sum(d), 2), "calls": len(d)} for name, d in ranked}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="2 nodes, 0.5 s then 1 s children, a few dozen children")  # fmt: skip
    p.add_argument("--nodes", default="1,2,4,8", help="worker node counts to sweep")
    p.add_argument("--seconds", default="0.5,5", help="child durations to sweep")
    p.add_argument("--slots", type=int, default=2,
                   help="children at once per node (each has a ~0.9 GB env runner on the head: "
                        "8 nodes x 2 slots fit 24 GB)")  # fmt: skip
    p.add_argument("--iterations", type=int, default=10,
                   help="search iterations per point (per child duration)")  # fmt: skip
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale"))
    args = p.parse_args(argv)
    from pipeline.config import environment

    environment.apply()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    environment.quiet_ray_loggers()
    if args.quick:
        args.nodes, args.seconds, args.slots, args.iterations = "2", "0.5,1", 2, 4
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    teacher = make_teacher(out)
    nodes = [int(n) for n in args.nodes.split(",")]
    durations = [float(s) for s in args.seconds.split(",")]
    points = []
    for n in nodes:
        print(f"nodes {n}, children of {', '.join(f'{s:g}' for s in durations)} s ...",
              flush=True)  # fmt: skip
        for point in one_cluster(n, args.slots, durations, args.iterations, out, teacher,
                                 profile=n == max(nodes)):  # fmt: skip
            points.append(point)
            print(f"  {point['child_s']:g} s: {point['children']} children in "
                  f"{point['search_s']} s: {point['children_per_s']:.2f}/s of "
                  f"{point['ideal_per_s']:.2f} ideal ({point['efficiency']:.0%}), overhead "
                  f"{point['overhead_ms_median']:.0f} ms", flush=True)  # fmt: skip
    points.sort(key=lambda p: (p["child_s"], p["nodes"]))
    doc = {"points": points, "machine": {"cpus": os.cpu_count()}, "slots": args.slots}
    (out / "scale.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(table(points))
    return 0


def make_teacher(out: Path) -> Path:
    """An (untrained) ResNet-18 w0.25 teacher for Fashion-MNIST: its size sets the payload's
    and the children's; its accuracy does not matter to a sleeping child."""
    import torch

    from envs.builders import build_model
    from envs.checkpoint import save_checkpoint
    from envs.spec import teacher_spec

    folder = out / "teacher"
    if not (folder / "weights.pt").is_file():
        base = {"arch": "resnet18", "kwargs": {"num_classes": 10, "in_channels": 1, "width": 0.25},
                "input_shape": [1, 28, 28]}  # fmt: skip
        torch.manual_seed(0)
        save_checkpoint(folder, build_model(base), teacher_spec(base),
                        {"val_accuracy": 0.9, "test_accuracy": 0.9})  # fmt: skip
    return folder


def table(points: list[dict[str, Any]]) -> str:
    lines = ["| nodes | child | children | children/s | ideal | efficiency | path overhead "
             "(median, p90) | iteration overhead | driver records / child | head RSS / child "
             "| payload copies "
             "| env runner RSS |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: |"]  # fmt: skip
    for p in points:
        head = sum(v for v in p["head_bytes_per_child"].values())
        runner = p.get("actors", {}).get("SingleAgentEnvRunner", {})
        gap = p.get("iteration_overhead_s_median")
        kept = p.get("driver_record_bytes_per_child")
        kept = f"{kept:,.0f} B" if kept else "-"
        lines.append(
            f"| {p['nodes']} | {p['child_s']:g} s | {p['children']} | {p['children_per_s']:.2f} | "
            f"{p['ideal_per_s']:.2f} | {p['efficiency']:.0%} | {p['overhead_ms_median']:.0f} ms, "
            f"{p['overhead_ms_p90']:.0f} ms | {f'{gap:.2f} s' if gap is not None else '-'} | "
            f"{kept} | {head:,.0f} B | "
            f"{p['payload_copies']} | "
            f"{runner.get('count', 0)} x {runner.get('mean_mb', 0):.0f} MB |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
