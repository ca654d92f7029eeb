"""Faults: runs refused at the door leave nothing; kills and evictions lose and repeat nothing.

The door tests run the real ``n2n`` in this process or as a separate process and check that
nothing was created: no run directory, no MLflow store, no Ray session (``init_ray`` is made
to fail the test if reached). The slow test plays a Kubernetes eviction (SIGTERM) and a
killed driver (SIGKILL) against real ``n2n run`` processes on the session's Ray cluster, with
real KD children on digits and a real SQLite MLflow store, then resumes to the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.cli.main import main
from pipeline.tracking.rundir import RunDir

REPO = Path(__file__).resolve().parent.parent


def _no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(cfg: Any) -> bool:
        raise AssertionError("Ray was started for a run that should be refused at the door")

    monkeypatch.setattr("pipeline.cluster.runtime.init_ray", refuse)


def _refused(argv: list[str], capsys, monkeypatch, cwd: Path) -> str:
    """Runs ``n2n`` here in ``cwd``; asserts exit 2, one line, no Ray; returns the line."""
    _no_ray(monkeypatch)
    monkeypatch.chdir(cwd)
    assert main(argv) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert not (cwd / "mlflow.db").exists(), "an MLflow store was created for a refused run"
    return lines[0]


# --------------------------------------------------------------------------- at the door


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_run_starts_its_own_ray_beside_one_left_by_ray_start(tmp_path: Path) -> None:
    """A head started with ``ray start`` (here ``cluster_utils``, which starts one the same
    way) is what a bare ``ray.init()`` joins; a run without ``ray.address`` must not."""
    from ray.cluster_utils import Cluster

    other = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": False}
    )
    try:
        script = (
            "import ray\n"
            "from pipeline.cluster.runtime import init_ray\n"
            "from pipeline.config.presets import load_config\n"
            "assert init_ray(load_config('demo', ['ray.num_cpus=1']))\n"
            "print(ray.cluster_resources().get('CPU'), ray.get_runtime_context().gcs_address)\n"
        )
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("RAY_ADDRESS", None)
        done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=240)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        cpus, address = done.stdout.split()[-2:]
        assert float(cpus) == 1.0 and address != other.address
    finally:
        other.shutdown()


def test_an_unreachable_address_exits_2_within_30_s_and_leaves_nothing(tmp_path: Path) -> None:
    ray_tmp = tmp_path / "ray-tmp"
    ray_tmp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": str(ray_tmp)}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--address", "127.0.0.1:1",
         "--run-dir", str(tmp_path / "run")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    assert elapsed < 30, elapsed
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "127.0.0.1:1" in lines[0] and "ray start --head" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ray-tmp"]  # no run dir, no mlflow.db
    assert not any(ray_tmp.iterdir()), "a Ray session was started"


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("garbage spec", "is not valid JSON"),
        ("spec without a model", "cannot be loaded"),
        ("truncated weights", "is damaged, truncated or not a PyTorch weights file"),
        ("weights of another net", "do not match"),
    ],
)
def test_a_bad_teacher_checkpoint_exits_2_before_ray(
    damage: str, expected: str, digits_teacher_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    teacher = tmp_path / "teacher"
    shutil.copytree(digits_teacher_dir, teacher)
    if damage == "garbage spec":
        (teacher / "spec.json").write_text("{not json at all")
    elif damage == "spec without a model":
        (teacher / "spec.json").write_text(json.dumps({"format": "n2n-student/1"}))
    elif damage == "truncated weights":
        data = (teacher / "weights.pt").read_bytes()
        (teacher / "weights.pt").write_bytes(data[: len(data) // 2])
    else:
        spec = json.loads((teacher / "spec.json").read_text())
        spec["base"]["kwargs"]["width"] = 1.0  # the weights are of width 0.5
        (teacher / "spec.json").write_text(json.dumps(spec))
    line = _refused(
        ["run", "--run-dir", str(tmp_path / "run"), "--set", f"teacher.checkpoint={teacher}"],
        capsys, monkeypatch, tmp_path,
    )  # fmt: skip
    assert expected in line and str(teacher) in line, line
    assert not (tmp_path / "run").exists()


def test_a_teacher_for_other_data_exits_2_before_ray(
    digits_teacher_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (make system-deps)")
    line = _refused(
        ["run", "--run-dir", str(tmp_path / "run"), "--set", "data.name=fashion-mnist",
         "--set", f"teacher.checkpoint={digits_teacher_dir}"],
        capsys, monkeypatch, tmp_path,
    )  # fmt: skip
    assert "expects images of shape [1, 8, 8]" in line and "[1, 28, 28]" in line, line


@pytest.mark.parametrize("where", ["under a file", "read-only file system"])
def test_an_unwritable_run_dir_exits_2_before_ray(
    where: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    if where == "under a file":
        (tmp_path / "a-file").write_text("")
        run_dir = tmp_path / "a-file" / "run"
    else:  # /proc refuses new files even to root, unlike a chmod-ed folder
        run_dir = Path("/proc/n2n-test-run")
    line = _refused(["run", "--run-dir", str(run_dir)], capsys, monkeypatch, tmp_path)
    assert str(run_dir) in line and "choose another --run-dir" in line, line
    assert not run_dir.exists()


def test_an_unbuildable_custom_teacher_exits_2_before_ray(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    (tmp_path / "brokennets.py").write_text(
        "def net(num_classes):\n    raise RuntimeError('this builder is broken')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    line = _refused(
        ["run", "--run-dir", str(tmp_path / "run"), "--set", "teacher.arch=brokennets:net"],
        capsys, monkeypatch, tmp_path,
    )  # fmt: skip
    assert "brokennets:net" in line and "this builder is broken" in line, line


# --------------------------------------------------------------------------- resume bookkeeping


def _rows(trial: str, iteration: int, first_episode: int, n: int) -> list[dict[str, Any]]:
    return [
        {"stage": "removal", "trial": trial, "iteration": iteration, "episode": first_episode + i,
         "arch_hash": f"h{iteration}-{i}", "params": 10, "compression": 0.8, "accuracy": 0.9,
         "reward": 0.5}
        for i in range(n)
    ]  # fmt: skip


def test_children_of_an_uncommitted_iteration_are_dropped_on_resume(tmp_path: Path) -> None:
    out = RunDir(tmp_path)
    out.append_children(_rows("t1", 1, 1, 3) + _rows("t1", 2, 4, 3) + _rows("t1", 3, 7, 2))
    for it in (1, 2):  # iteration 3's row never made it: the driver died in between
        out.append_iteration({"stage": "removal", "trial": "t1", "iteration": it, "episodes": 3})
    assert out.committed("removal") == {"t1": 2}
    assert out.drop_uncommitted() == 2
    assert [r["episode"] for r in out.children()] == [1, 2, 3, 4, 5, 6]
    assert out.drop_uncommitted() == 0


def test_a_replayed_iteration_is_not_recorded_twice(ray_cluster, tmp_path: Path) -> None:
    """Tune restored a trial from a checkpoint older than the driver's records."""
    from types import SimpleNamespace

    from pipeline.search.records import ChildLog
    from pipeline.tracking.progress import Clock, StageMonitor

    out = RunDir(tmp_path)
    out.append_children(_rows("t1", 1, 1, 2) + _rows("t1", 2, 3, 2))
    for it in (1, 2):
        out.append_iteration({"stage": "removal", "trial": "t1", "iteration": it, "episodes": 2})
    log = ChildLog.remote()
    monitor = StageMonitor("removal", log, out, Clock(3))
    trial = SimpleNamespace(trial_id="t1", config={})
    for iteration in (2, 3):  # 2 is the replay, 3 is new
        for row in _rows("t1", iteration, 0, 2):
            ray_cluster.get(log.append.remote("t1", row))
        monitor.on_result(trial, {"iteration": iteration, "episodes_expected": 2})
    assert monitor.replayed == 1
    assert [(r["iteration"], r["episode"]) for r in out.children()] == [
        (1, 1), (1, 2), (2, 3), (2, 4), (3, 5), (3, 6)
    ]  # fmt: skip
    assert [int(r["iteration"]) for r in out.iterations()] == [1, 2, 3]
    ray_cluster.kill(log)


# --------------------------------------------------------------------------- real processes


def _flags(run_dir: Path, uri: str) -> list[str]:
    return [
        "run", "--run-dir", str(run_dir), "--quiet", "--episodes", "4", "--iterations", "3",
        "--skip-shrinkage", "--tracking-uri", uri, "--set", "tracking.experiment=faults",
        "--set", "tracking.registry_name=faults-student", "--set", "teacher.epochs=4",
        "--set", "teacher.width=0.5", "--set", "distill.steps=30", "--set", "finetune.steps=60",
        "--set", "finetune.top_k=2",
    ]  # fmt: skip


def _trained(run_dir: Path) -> set[str]:
    """The architectures a run trained: its reward cache's keys."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(run_dir / "cache.sqlite")) as db:
        return {row[0].split("-")[0] for row in db.execute("SELECT key FROM results")}


def _start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *argv], cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def _wait_for_iterations(proc: subprocess.Popen, run_dir: Path, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(RunDir(run_dir).iterations()) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"iteration {n} did not finish in time"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_an_eviction_then_a_killed_driver_then_resume_give_one_exact_run(
    ray_cluster, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    run_dir, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    address = ray_cluster.get_runtime_context().gcs_address
    client = MlflowClient(tracking_uri=uri)

    # 1. An eviction: SIGTERM once an iteration is recorded.
    first = _start([*_flags(run_dir, uri), "--address", address])
    _wait_for_iterations(first, run_dir, 1, timeout=180)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=90)
    assert first.returncode == 143, err
    assert err.strip().splitlines()[-1] == (
        f"n2n run: terminated (SIGTERM); continue with: n2n run --resume {run_dir}"
    )
    experiment = client.get_experiment_by_name("faults")
    runs = client.search_runs([experiment.experiment_id])
    assert {r.info.status for r in runs} == {"KILLED"}, [
        (r.info.run_name, r.info.status) for r in runs
    ]

    # 2. The resumed driver is killed outright once it recorded one more iteration.
    second = _start(["run", "--resume", str(run_dir), "--quiet", "--address", address])
    _wait_for_iterations(second, run_dir, 2, timeout=180)
    second.kill()
    second.communicate(timeout=30)

    # 3. Resumed again, to the end.
    third = _start(["run", "--resume", str(run_dir), "--quiet", "--address", address])
    _, err = third.communicate(timeout=300)
    assert third.returncode == 0, err

    out = RunDir(run_dir)
    iterations = [(r["stage"], int(r["iteration"])) for r in out.iterations()]
    assert iterations == [("removal", 1), ("removal", 2), ("removal", 3)]  # none twice
    children = out.children("removal")
    assert [r["episode"] for r in children] == list(range(1, 13))  # the budget, exactly
    assert sorted({r["iteration"] for r in children}) == [1, 2, 3]
    assert out.done("removal")["children"] == 12
    assert out.summary()["children"]["evaluated"] == 12

    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    parent = parents[0]
    assert parent.info.status == "FINISHED" and int(parent.data.tags["n2n.resumed"]) == 2
    stages = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert [r.data.tags["n2n.stage"] for r in stages if r.info.status != "KILLED"] == ["removal"]
    assert all(r.info.status in ("FINISHED", "KILLED") for r in runs)
    live = next(r for r in stages if r.info.status == "FINISHED")
    steps = [m.step for m in client.get_metric_history(live.info.run_id, "reward/mean")]
    assert sorted(steps) == [1, 2, 3]
    # The learner's health, per iteration (pipeline.search.learner): a collapsed policy shows.
    for key in ("learner/entropy", "learner/approx_kl", "learner/clip_fraction",
                "learner/vf_explained_var"):  # fmt: skip
        history = client.get_metric_history(live.info.run_id, key)
        assert sorted(m.step for m in history) == [1, 2, 3], key
    entropy = client.get_metric_history(live.info.run_id, "learner/entropy")
    assert all(m.value > 0 for m in entropy)  # 5 binary choices: at most 5 ln 2
    assert all(
        0 <= m.value <= 1
        for m in client.get_metric_history(live.info.run_id, "learner/clip_fraction")
    )
    assert client.get_model_version_by_alias("faults-student", "champion").run_id == (
        parent.info.run_id
    )
    assert int(live.data.tags["n2n.resumed"]) == 2  # the continued stage run says so too

    # 4. The same search uninterrupted trains exactly the same children, in the same order:
    # each replayed iteration drew the actions it drew the first time.
    reference = tmp_path / "reference"
    flags = [*_flags(reference, uri), "--no-tracking", "--address", address]
    uninterrupted = _start(flags)
    _, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err
    expected = RunDir(reference).children("removal")
    assert [(r["iteration"], r["arch_hash"]) for r in children] == [
        (r["iteration"], r["arch_hash"]) for r in expected
    ]
    assert _trained(run_dir) == _trained(reference)
    assert [r["reward"] for r in children] == [r["reward"] for r in expected]


def test_a_resumed_tracker_continues_the_run_and_sends_what_the_dead_driver_had_not(
    tmp_path: Path,
) -> None:
    from mlflow import MlflowClient

    from pipeline.tracking.tracker import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    teacher = {"params": 1000, "test_accuracy": 0.9, "arch": "small_cnn"}
    first = Tracker(uri, "resume")
    first.check_reachable()
    run_id = first.start({"name": "r"}, teacher, dataset="digits")
    first.log_iteration("removal", 1, {"reward/mean": 0.1, "episodes/sampled": 2})
    first.log_children(_rows("t1", 1, 1, 2))
    first.outbox.drain(strict=True)
    client = MlflowClient(tracking_uri=uri)
    stage_id = first._stages["removal"].run_id
    # The driver dies here, nothing closed; a second copy of the stage run is left RUNNING.
    time.sleep(0.01)
    copy = client.create_run(
        first.experiment_id, tags={"mlflow.parentRunId": run_id, "n2n.stage": "removal"}
    ).info.run_id

    second = Tracker(uri, "resume")
    second.check_reachable()
    children = _rows("t1", 1, 1, 2) + _rows("t1", 2, 3, 2)  # iteration 2 never reached MLflow
    iterations = {"removal": [(1, {"reward/mean": 0.1, "episodes/sampled": 2}),
                              (2, {"reward/mean": 0.3, "episodes/sampled": 2})]}  # fmt: skip
    resumed = second.resume(run_id, {"name": "r"}, teacher, dataset="digits",
                            children=children, iterations=iterations)  # fmt: skip
    assert resumed == run_id and client.get_run(run_id).info.status == "RUNNING"
    assert second._stages["removal"].run_id == stage_id  # the first copy, with the history
    assert client.get_run(copy).info.status == "KILLED"
    history = client.get_metric_history(stage_id, "reward/mean")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.1), (2, 0.3)]  # none twice
    assert sorted(m.step for m in client.get_metric_history(stage_id, "child/reward")) == [
        0,
        1,
        2,
        3,
    ]
    second.log_children(_rows("t1", 3, 5, 1))
    second.close()
    assert client.get_run(run_id).info.status == "FINISHED"
    assert client.get_run(stage_id).info.status == "FINISHED"
    assert client.get_run(run_id).data.tags["n2n.resumed"] == "1"
    assert client.get_run(stage_id).data.tags["n2n.resumed"] == "1"  # the stage run too
    table = client.download_artifacts(run_id, "children.json", str(tmp_path))
    assert [row[3] for row in json.loads(Path(table).read_text())["data"]] == [1, 2, 3, 4, 5]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_an_eviction_during_fine_tuning_after_the_search_stops_the_run(
    ray_cluster, tmp_path: Path
) -> None:
    """Tune leaves its SIGINT handler behind after a search; a SIGTERM during fine-tuning must
    still stop the run (exit 143), not be swallowed by it, and the resume trains no child."""
    run_dir, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    address = ray_cluster.get_runtime_context().gcs_address
    flags = [*_flags(run_dir, uri), "--set", "finetune.steps=4000", "--address", address]
    proc = _start(flags)
    deadline = time.monotonic() + 240
    while not RunDir(run_dir).done("removal"):  # the search is over: fine-tuning starts
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the search did not finish in time"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 143, err[-2000:]
    assert not (run_dir / "summary.json").exists()
    trained = _trained(run_dir)

    resumed = _start(["run", "--resume", str(run_dir), "--quiet", "--address", address])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert _trained(run_dir) == trained  # the search's children came from the reward cache
    assert RunDir(run_dir).summary()["children"]["evaluated"] == 12
