"""Losing a worker node mid-search: its children are retried and counted, no record is lost.

A real two-node Ray cluster on this machine (``ray start --head`` and ``ray start --address``):
the head takes no Ray work (``--num-cpus 0``, as the chart's head), so every child trains on
the worker node. The test runs the real ``n2n run --address`` CLI against it,
kills the worker node's raylet (SIGKILL, as a preempted or evicted node dies) while a child
trains there, and starts a new worker node, as an autoscaler replacing it would. The trial and
its env runners stay on the head (``pipeline.search.records.ON_HEAD``), so the search itself survives.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.config.presets import load_config
from pipeline.search.records import ON_HEAD, RUNNER_CPUS, runner_cpus
from pipeline.search.rllib import trial_resources
from pipeline.search.trial import stage_settings
from pipeline.tracking.rundir import RunDir

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")
MARKER = "n2n_lost_node"
"""A custom resource that only the node to be killed has, to tell its raylet apart."""
LOSSES = (
    "NodeDiedError",
    "WorkerCrashedError",
    "LocalRayletDiedError",
    "OwnerDiedError",
    "ObjectLostError",
)


def test_the_trial_and_its_env_runners_ask_for_the_head_node() -> None:
    cfg = load_config(
        "demo",
        [
            "search.env_runners=2",
            "removal.episodes_per_iteration=4",
            "shrinkage.episodes_per_iteration=4",
        ],
    )
    for algo in ("ppo", "appo", "random"):
        search = cfg.search.model_copy(update={"algo": algo})
        settings = stage_settings(
            "removal", search, cfg.removal, {"teacher": "unused"}, units=5, choices=2, seed=0,
            log_name="unused", sample_timeout_s=60.0,
        )  # fmt: skip
        bundles = trial_resources(settings).bundles
        assert len(bundles) == 3, bundles  # main + 2 env runners (random search's workers)
        assert all(bundle[name] == ON_HEAD[name] for bundle in bundles for name in ON_HEAD)


def test_the_search_reserves_head_cpus_only_where_the_head_has_them(ray_cluster) -> None:
    # The session's local cluster has 2 CPUs: main process + 7 env runners fit at 0.25 each,
    # + 8 do not, and then (as on a KubeRay head with num-cpus 0) they reserve none.
    assert runner_cpus(1) == runner_cpus(7) == RUNNER_CPUS
    assert runner_cpus(8) == 0.0


# --------------------------------------------------------------------------- slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _processes() -> Iterator[tuple[int, int, str]]:
    """(pid, parent pid, command line) of every process this user can read."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        yield int(entry), ppid, cmdline.strip()


def _tree(roots: set[int]) -> set[int]:
    """``roots`` and all their descendants."""
    procs = list(_processes())
    found, grew = set(roots), True
    while grew:
        more = {pid for pid, ppid, _ in procs if ppid in found} - found
        found |= more
        grew = bool(more)
    return found


def _raylet(temp_dir: str, marker: str) -> int | None:
    """PID of this cluster's raylet whose node has the resource ``marker``."""
    for pid, _, cmd in _processes():
        if "raylet/raylet" in cmd and temp_dir in cmd and f"{marker}," in cmd:
            return pid
    return None


def _kill_cluster(temp_dir: str, port: int) -> None:
    """SIGKILLs this cluster's processes and their workers, only them: those that name its temp
    dir or (the Ray Client server) its GCS port."""
    gcs = re.compile(rf"--address=\S+:{port}(\s|$)")
    mine = {
        pid
        for pid, _, cmd in _processes()
        if (temp_dir in cmd or gcs.search(cmd)) and pid != os.getpid()
    }
    for pid in _tree(mine):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Cluster:
    """A local multi-node Ray cluster of ``ray start`` processes in a private temp dir."""

    def __init__(self) -> None:
        # Short: Ray's socket paths under it must stay within the 107-byte Unix limit.
        self.temp_dir = tempfile.mkdtemp(prefix="n2n-wl-", dir="/tmp")
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {
            **os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }  # fmt: skip
        self.env.pop("RAY_ADDRESS", None)

    def _start(self, *args: str) -> None:
        common = [
            "--object-store-memory", str(100 * 1024**2), "--disable-usage-stats",
            "--dashboard-agent-listen-port", str(_free_port()),
            "--dashboard-agent-grpc-port", str(_free_port()),
            "--metrics-export-port", str(_free_port()),
        ]  # fmt: skip
        proc = subprocess.run(
            [RAY, "start", *args, *common], env=self.env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def head(self, num_cpus: int) -> None:
        self._start(
            "--head", "--port", str(self.port), "--temp-dir", self.temp_dir,
            "--num-cpus", str(num_cpus), "--include-dashboard", "false",
            "--dashboard-port", str(_free_port()), "--ray-client-server-port", str(_free_port()),
        )  # fmt: skip

    def worker(self, num_cpus: int, resources: dict[str, float] | None = None) -> None:
        self._start(
            "--address", self.address, "--num-cpus", str(num_cpus),
            "--resources", json.dumps(resources or {}),
        )  # fmt: skip

    def close(self) -> None:
        _kill_cluster(self.temp_dir, self.port)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    cluster = Cluster()
    try:
        yield cluster
    finally:
        cluster.close()


def _child_running_on(raylet: int) -> bool:
    """Whether a worker of that raylet is executing a child's KD task right now."""
    return any(
        ppid == raylet and cmd.startswith("ray::child_task") for _, ppid, cmd in _processes()
    )


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_losing_a_worker_node_mid_search_loses_no_child(cluster: Cluster, tmp_path: Path) -> None:
    # The chart's layout: a head that takes no Ray work (num-cpus 0) runs the driver, the
    # trial and its env runners (reserving no CPU there, pipeline.search.records.runner_cpus); every
    # child trains on a worker node.
    cluster.head(num_cpus=0)
    cluster.worker(num_cpus=2, resources={MARKER: 1})
    doomed = _raylet(cluster.temp_dir, MARKER)
    assert doomed is not None, "the worker node's raylet was not found"

    run_dir = tmp_path / "run"
    iterations, episodes = 2, 4
    flags = [
        "run", "--address", cluster.address, "--run-dir", str(run_dir), "--no-tracking",
        "--quiet", "--skip-shrinkage", "--iterations", str(iterations),
        "--episodes", str(episodes), "--set", "teacher.epochs=4", "--set", "teacher.width=0.5",
        "--set", "distill.steps=60", "--set", "finetune.steps=60", "--set", "finetune.top_k=2",
        "--set", "ray.cpus_per_child=1",
    ]  # fmt: skip
    run = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *flags], cwd=REPO, env=cluster.env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not _child_running_on(doomed):
            assert run.poll() is None, run.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no child started on the worker node in time"
            time.sleep(0.05)
        os.kill(doomed, signal.SIGKILL)  # the node dies with the child it is training
        cluster.worker(num_cpus=2)  # and a new one takes its place
        output, _ = run.communicate(timeout=240)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, output[-3000:]

    out = RunDir(run_dir)
    rows = out.children()
    # Every child the budget asks for is recorded exactly once.
    assert sorted(r["episode"] for r in rows) == list(range(1, iterations * episodes + 1))
    assert all(r["stage"] == "removal" for r in rows)
    for row in out.iterations():
        assert int(row["episodes"]) == int(row["episodes_expected"]) == episodes, row
    # The child lost with the node was retried, and its record says so.
    retries = [int(r["retries"] or 0) for r in rows]
    assert sum(retries) >= 1, rows
    for row, retried in zip(rows, retries, strict=True):
        if retried:
            assert not row["error"] and row["accuracy"] is not None, row  # trained anew
        lost = any(name in (row["error"] or "") for name in LOSSES)
        assert not lost or retried == 3, row  # a loss is an error only past max_retries
    summary = out.summary()
    assert summary["children"]["evaluated"] == iterations * episodes
    assert summary["children"]["retried"] == sum(n > 0 for n in retries)
    assert summary["children"]["retries"] == sum(retries)
    assert any("ran again" in warning for warning in summary["warnings"])
    # The reward cache lived through it too (on the head): its counters were not reset.
    distinct = {r["arch_hash"] for r in rows}
    assert summary["cache"]["misses"] == len(distinct) + sum(retries), summary["cache"]
    assert (run_dir / "best" / "weights.pt").is_file()
