"""MLflow tracking against a real ``mlflow server`` on loopback with a SQLite backend (no mocks).

A tiny search is played through the :class:`~pipeline.tracking.tracker.Tracker` the way
``pipeline.search.trial`` drives it: a teacher and a student really trained on sklearn's digits, two
stages of iterations and children (one child failed), a run directory with the search's files,
then ``finish``. The tests read everything back through MLflow's own client.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from mlflow_server import MlflowServer, free_port

from envs.checkpoint import save_checkpoint
from envs.costs import model_costs
from envs.models import SmallCNN
from envs.spec import base_spec, teacher_spec
from pipeline.data.datasets import load_dataset
from pipeline.tracking import plots
from pipeline.tracking.redaction import flatten_config, redact, scrub
from pipeline.tracking.store import DEFAULT_TRACKING_URI
from pipeline.tracking.tracker import CHAMPION_ALIAS, RetryPolicy, Tracker

SECRET = "hunter2-S3CR3T"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
REGISTRY_NAME = "n2n-digits-student"


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.nn.Module:
    """Plain supervised training, a few SGD steps: enough for a real, non-trivial accuracy."""
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def child_record(stage: str, i: int, params: int, error: str = "") -> dict:
    """A row as the search writes it to children.csv."""
    failed = bool(error)
    return {
        "stage": stage,
        "episode": i,
        "action": [i % 2, 1, 0],
        "arch_hash": f"{stage[:3]}{i:013d}",
        "params": params,
        "flops": params * 40,
        "compression": 1 - params / 30000,
        "accuracy": None if failed else 0.5 + 0.04 * i,
        "reward": -1.0 if failed else 0.3 + 0.05 * i,
        "wall_time_s": 0.5,
        "cache_hit": i == 3,
        "error": error,
    }


def read_table(client: mlflow.MlflowClient, run_id: str, name: str) -> pd.DataFrame:
    """A table artifact as written by ``mlflow.log_table`` (JSON, ``orient="split"``)."""
    with tempfile.TemporaryDirectory() as tmp:
        return pd.read_json(client.download_artifacts(run_id, name, tmp), orient="split")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as srv:
        yield srv


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def tiny_run(server, digits, tmp_path_factory):
    """A whole tracked run: returns what a test needs to check it, read back from MLflow."""
    torch.manual_seed(0)
    x_tr, y_tr = digits.train
    x_te, y_te = digits.test
    shape = list(digits.input_shape)
    teacher = train(SmallCNN(num_classes=10, in_channels=1, width=0.25), x_tr, y_tr, steps=120)
    student = train(SmallCNN(num_classes=10, in_channels=1, width=0.125), x_tr, y_tr, steps=120)
    t_costs, s_costs = model_costs(teacher, shape), model_costs(student, shape)
    teacher_facts = {
        "arch": "small_cnn",
        **t_costs.as_dict(),
        "test_accuracy": accuracy(teacher, x_te, y_te),
    }
    student_acc = accuracy(student, x_te, y_te)
    spec = teacher_spec(base_spec("small_cnn", shape, num_classes=10, in_channels=1, width=0.125))

    config = {
        "name": "tiny",
        "data": {"name": "digits", "val_fraction": 0.2},
        "search": {"algo": "ppo", "stages": ["removal", "shrinkage"]},
        "shrinkage": {"ratios": [0.25, 0.5, 1.0]},
        "output": {"storage_path": "s3://bucket/n2n", "aws_secret_access_key": SECRET},
        "tracking": {"uri": f"http://n2n:{SECRET}@127.0.0.1:{server.port}", "api_token": SECRET},
    }
    records = {
        "removal": [child_record("removal", i, 20000 - 1000 * i) for i in range(6)],
        "shrinkage": [child_record("shrinkage", i, 9000 - 800 * i) for i in range(6)],
    }
    records["removal"][2] = child_record(
        "removal", 2, 18000, error="RuntimeError: shapes do not match"
    )

    run_dir = tmp_path_factory.mktemp("run")
    (run_dir / "config.yaml").write_text(f"secret: {SECRET}\n")  # must never be uploaded
    save_checkpoint(run_dir / "best", student, spec, {"test_accuracy": student_acc})
    (run_dir / "children.csv").write_text("stage,episode\nremoval,0\n")
    best = {**s_costs.as_dict(), "test_accuracy": student_acc, "arch_hash": "abc123"}
    summary = {
        "teacher": teacher_facts,
        "student": best,
        "students": [
            {"rank": 1, "best": True, **best},
            {"rank": 2, "params": 3000, "test_accuracy": student_acc - 0.1},
        ],
        "compression_ratio": t_costs.params / s_costs.params,
        "baselines": [{"name": "uniform 50%", "params": 7000, "test_accuracy": 0.8}],
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))

    tracker = Tracker(server.url, experiment="tiny-search", registry_name=REGISTRY_NAME)
    tracker.check_reachable()
    run_id = tracker.start(
        config, teacher_facts, dataset="digits", tags={"algo": "ppo", "stages": "removal,shrinkage"}
    )
    for stage, rows in records.items():
        with tracker.stage(stage):
            for step in range(2):
                batch = rows[3 * step : 3 * step + 3]
                tracker.log_children(batch)
                rewards = [r["reward"] for r in batch]
                tracker.log_iteration(
                    stage,
                    step,
                    {"reward/mean": float(np.mean(rewards)), "reward/max": max(rewards), "reward/min": min(rewards),
                     "children/evaluated": 3 * (step + 1), "cache/hits": 1, "best/accuracy": None},
                )  # fmt: skip
    registered = tracker.finish(run_dir, student, spec, summary, example_inputs=x_te[:4])
    tracker.close()
    return {
        "tracker": tracker,
        "run_id": run_id,
        "registered": registered,
        "records": records,
        "student_acc": student_acc,
        "teacher": teacher_facts,
        "client": mlflow.MlflowClient(tracking_uri=server.url),
        "test": (x_te, y_te),
    }


def test_parent_run_has_config_commit_dataset_teacher_and_tags(tiny_run):
    client, run = tiny_run["client"], tiny_run["client"].get_run(tiny_run["run_id"])
    assert run.info.status == "FINISHED"
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert params["data.name"] == "digits"
    assert params["shrinkage.ratios"] == "[0.25, 0.5, 1.0]"
    assert params["search.stages"] == '["removal", "shrinkage"]'
    assert params["output.aws_secret_access_key"] == "***"
    assert tags["n2n.algo"] == "ppo" and tags["n2n.stages"] == "removal,shrinkage"
    assert tags["n2n.dataset"] == "digits" and tags["n2n.teacher"] == "small_cnn"
    assert len(tags["mlflow.source.git.commit"].removesuffix("-dirty")) == 40
    assert metrics["teacher/params"] == tiny_run["teacher"]["params"]
    assert metrics["teacher/accuracy"] == pytest.approx(tiny_run["teacher"]["test_accuracy"])
    assert metrics["student/accuracy"] == pytest.approx(tiny_run["student_acc"])
    config = client.download_artifacts(run.info.run_id, "config.yaml")
    assert "digits" in Path(config).read_text()


def test_secrets_never_reach_params_tags_or_artifacts(tiny_run, tmp_path):
    client, run_id = tiny_run["client"], tiny_run["run_id"]
    run = client.get_run(run_id)
    logged = json.dumps([run.data.params, run.data.tags])
    assert SECRET not in logged
    assert "n2n:***@127.0.0.1" in run.data.params["tracking.uri"]
    local = Path(client.download_artifacts(run_id, "", dst_path=str(tmp_path)))
    texts = [
        p.read_text(errors="ignore") for p in local.rglob("*") if p.is_file() and p.suffix != ".png"
    ]
    assert texts and not any(SECRET in t for t in texts)
    assert not (local / "run" / "config.yaml").exists()


def test_a_password_in_the_tracking_uri_is_never_printed(server, capfd, caplog, monkeypatch):
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "false")
    caplog.set_level(logging.DEBUG, logger="pipeline")
    uri = server.url.replace("http://", f"http://n2n:{SECRET}@")
    with Tracker(uri, experiment="creds") as tracker:
        tracker.check_reachable()
        tracker.start({"name": "creds", "tracking": {"uri": uri}}, {"params": 1}, dataset="digits")
        with tracker.stage("removal"):
            tracker.log_children([child_record("removal", 0, 100)])
    out, err = capfd.readouterr()
    assert tracker.client.get_run(tracker.run_id).info.status == "FINISHED"
    assert SECRET not in out + err + caplog.text
    assert f"n2n:***@127.0.0.1:{server.port}" in caplog.text


def test_nested_stage_runs_log_iterations_as_steps(tiny_run):
    client, run_id = tiny_run["client"], tiny_run["run_id"]
    parent = client.get_run(run_id)
    nested = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'"
    )
    by_stage = {r.data.tags["n2n.stage"]: r for r in nested}
    assert set(by_stage) == {"removal", "shrinkage"}
    for stage, run in by_stage.items():
        assert run.info.status == "FINISHED" and run.info.run_name == f"stage-{stage}"
        history = client.get_metric_history(run.info.run_id, "reward/mean")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [0, 1]
        assert {
            m.step: m.value
            for m in client.get_metric_history(run.info.run_id, "children/evaluated")
        } == {0: 3, 1: 6}
        assert "best/accuracy" not in run.data.metrics  # None values are skipped, not logged as 0
        child_rewards = client.get_metric_history(run.info.run_id, "child/reward")
        expected = [r["reward"] for r in tiny_run["records"][stage]]
        assert [m.value for m in sorted(child_rewards, key=lambda m: m.step)] == pytest.approx(
            expected
        )
    # The failed child has a reward of -1 and no accuracy point.
    removal = by_stage["removal"].info.run_id
    assert sorted(m.step for m in client.get_metric_history(removal, "child/accuracy")) == [
        0,
        1,
        3,
        4,
        5,
    ]


def test_children_table_holds_every_child_and_the_failure_reason(tiny_run):
    table = read_table(tiny_run["client"], tiny_run["run_id"], "children.json")
    expected = tiny_run["records"]["removal"] + tiny_run["records"]["shrinkage"]
    assert len(table) == len(expected) == 12
    assert list(table["arch_hash"]) == [r["arch_hash"] for r in expected]
    failed = table[table["error"] != ""]
    assert list(failed["arch_hash"]) == [expected[2]["arch_hash"]]
    assert failed["error"].iloc[0] == "RuntimeError: shapes do not match"
    assert failed["reward"].iloc[0] == -1.0
    # Tagged as a table, so the UI and mlflow.load_table know it.
    logged = json.loads(
        tiny_run["client"].get_run(tiny_run["run_id"]).data.tags["mlflow.loggedArtifacts"]
    )
    assert {"path": "children.json", "type": "table"} in logged


def test_artifacts_plots_results_summary_and_spec(tiny_run, tmp_path):
    client, run_id = tiny_run["client"], tiny_run["run_id"]
    local = Path(client.download_artifacts(run_id, "", dst_path=str(tmp_path)))
    for name in ("pareto.png", "reward_removal.png", "reward_shrinkage.png"):
        png = (local / "plots" / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
    spec = json.loads((local / "student" / "spec.json").read_text())
    assert spec["base"]["kwargs"]["width"] == 0.125
    summary = json.loads((local / "summary.json").read_text())
    assert summary["student"]["test_accuracy"] == pytest.approx(tiny_run["student_acc"])
    results = json.loads((local / "results.json").read_text())
    names = [row[results["columns"].index("name")] for row in results["data"]]
    assert names == ["teacher", "student 1 (best)", "student 2", "uniform 50%"]
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(local / "plots" / "pareto.png", ARTIFACTS / "pareto.png")
    assert (local / "run" / "summary.json").is_file() and (
        local / "run" / "best" / "spec.json"
    ).is_file()
    assert (local / "student_onnx" / "student.onnx").is_file()


def test_champion_reproduces_reported_accuracy_and_onnx_matches(tiny_run, tmp_path):
    client, registered = tiny_run["client"], tiny_run["registered"]
    assert registered.champion_uri == f"models:/{REGISTRY_NAME}@{CHAMPION_ALIAS}"
    version = client.get_model_version_by_alias(REGISTRY_NAME, CHAMPION_ALIAS)
    assert version.version == registered.version and version.run_id == tiny_run["run_id"]
    assert float(version.tags["test_accuracy"]) == pytest.approx(tiny_run["student_acc"])
    assert version.tags["dataset"] == "digits" and version.tags["teacher"] == "small_cnn"
    assert float(version.tags["compression_ratio"]) > 1 and int(version.tags["params"]) > 0
    assert int(version.tags["flops"]) > 0 and version.tags["onnx_matches"] == "true"

    mlflow.set_tracking_uri(tiny_run["tracker"].uri)
    model = mlflow.pytorch.load_model(registered.champion_uri)
    x_te, y_te = tiny_run["test"]
    with torch.no_grad():
        logits = model(x_te)
    reloaded_acc = float((logits.argmax(1) == y_te).float().mean())
    assert reloaded_acc == pytest.approx(tiny_run["student_acc"], abs=1e-9)
    assert reloaded_acc > 0.2  # a trained model, not chance (0.1)

    onnx_path = client.download_artifacts(
        tiny_run["run_id"], registered.onnx_artifact, str(tmp_path)
    )
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {"input": x_te.numpy()})[0]
    assert np.abs(onnx_logits - logits.numpy()).max() < 1e-4
    assert float((onnx_logits.argmax(1) == y_te.numpy()).mean()) == pytest.approx(reloaded_acc)


def test_unreachable_server_is_a_clear_error_before_any_work():
    port = free_port()
    tracker = Tracker(f"http://127.0.0.1:{port}", experiment="x")
    started = time.monotonic()
    with pytest.raises(ValueError, match=rf"127\.0\.0\.1:{port} is unreachable.*--tracking-uri"):
        tracker.check_reachable()
    assert time.monotonic() - started < 10


def test_bad_names_are_rejected_with_the_fix():
    with pytest.raises(ValueError, match="registry model name 'a/b'.*tracking.registry_name"):
        Tracker("sqlite:///x.db", registry_name="a/b")
    with pytest.raises(ValueError, match="experiment name is empty"):
        Tracker("sqlite:///x.db", experiment=" ")
    with pytest.raises(ValueError, match="does not exist"):
        Tracker("sqlite:////no/such/folder/mlflow.db").check_reachable()


def test_default_store_is_sqlite_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker(None, experiment="local")
    assert tracker.uri == DEFAULT_TRACKING_URI
    tracker.check_reachable()
    with tracker:
        tracker.start({"name": "local"}, {"params": 10}, dataset="digits")
        with tracker.stage("removal"):
            tracker.log_children([child_record("removal", 0, 100)])
    assert (tmp_path / "mlflow.db").is_file()
    run = tracker.client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["teacher/params"] == 10
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:5000")
    assert Tracker(None).uri == "http://example.invalid:5000"
    assert Tracker("sqlite:///other.db").uri == "sqlite:///other.db"


def test_redaction_of_config_trees_and_urls():
    config = {
        "s3": {"AWS_ACCESS_KEY_ID": "AKIA123", "endpoint": "https://minio:9000"},
        "auth": {"password": "pw", "token": None, "keep": [{"client_secret": "cs"}]},
        "uri": "postgresql://user:pw0rd@db/mlflow",
        "url": "https://host/path?sig=abc&x=1",
    }
    flat = flatten_config(config)
    assert flat["s3.AWS_ACCESS_KEY_ID"] == "***" and flat["s3.endpoint"] == "https://minio:9000"
    assert flat["auth.password"] == "***" and flat["auth.token"] == "null"
    assert flat["auth.keep"] == '[{"client_secret": "***"}]'
    assert flat["uri"] == "postgresql://user:***@db/mlflow"
    assert redact(config)["url"] == "https://host/path?sig=***&x=1"
    assert (
        scrub("GET https://u:pw@host/p?token=abc&x=1") == "GET https://u:***@host/p?token=***&x=1"
    )


def test_pareto_front_keeps_only_undominated_points():
    points = [(10, 0.5), (20, 0.7), (15, 0.4), (30, 0.7), (5, 0.2), (40, 0.9)]
    assert plots.pareto_front(points) == [(5, 0.2), (10, 0.5), (20, 0.7), (40, 0.9)]


@pytest.mark.timeout(180)
def test_server_restart_mid_run_loses_no_child_record(tmp_path, monkeypatch, caplog):
    """The tracking server dies between log_children calls and comes back on the same store."""
    # MLflow's own HTTP retries would hide the outage; leave retrying to the tracker.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    caplog.set_level(logging.WARNING, logger="pipeline.tracking.tracker")
    records = [child_record("removal", i, 20000 - 100 * i) for i in range(15)]
    server = MlflowServer(tmp_path / "mlflow").start()
    restarter = None
    try:
        tracker = Tracker(
            server.url, experiment="restart", retry=RetryPolicy(attempts=2, first_delay_s=0.1)
        )
        tracker.check_reachable()
        tracker.start({"name": "restart"}, {"params": 20000}, dataset="digits")
        with tracker.stage("removal"):
            tracker.log_children(records[:5])
            server.stop()
            # Down for longer than the retries: kept, not raised, not lost.
            tracker.log_children(records[5:10])
            tracker.log_iteration("removal", 0, {"reward/mean": 0.5})
            assert "operations kept" in caplog.text
            restarter = threading.Thread(target=server.start)
            restarter.start()
            # Down while the server restarts: retried with backoff until it answers.
            tracker.outbox.policy = RetryPolicy(attempts=15, first_delay_s=0.5, max_delay_s=2.0)
            tracker.log_children(records[10:])
            restarter.join()
            assert "retry 1 of 14" in caplog.text
        tracker.close()

        client = mlflow.MlflowClient(tracking_uri=server.url)
        table = read_table(client, tracker.run_id, "children.json")
        assert list(table["arch_hash"]) == [r["arch_hash"] for r in records]
        stage = client.search_runs(
            [tracker.experiment_id], f"tags.mlflow.parentRunId = '{tracker.run_id}'"
        )[0]
        steps = sorted(m.step for m in client.get_metric_history(stage.info.run_id, "child/reward"))
        assert steps == list(range(15))
        assert [m.step for m in client.get_metric_history(stage.info.run_id, "reward/mean")] == [0]
        assert stage.info.status == "FINISHED"
        assert client.get_run(tracker.run_id).info.status == "FINISHED"
    finally:
        if restarter is not None:
            restarter.join()
        server.stop()
