"""``n2n submit`` and results that outlive a Ray job.

- Inside a Ray job, ``n2n run`` refuses paths that die with the job (``pipeline.cluster.job_paths``).
- ``--address``: a real Ray head (``ray start``) with its job server on loopback and token
  authentication on, its token in a temporary HOME; the demo is submitted both with the
  README's ``ray job submit`` line and with ``n2n submit --address``, and the run directory and
  the registered model are found where the README says once the jobs are done.
- ``--k8s``: no Kubernetes API server can run here (none in any reachable registry, no
  container engine), so :class:`KubeStandIn` answers the handful of calls ``n2n submit --k8s``
  makes (create RayJob and ConfigMap, read the RayJob, list and read the submitter pod's log,
  delete both) on loopback and records what it was sent. What it is sent is checked against the
  real KubeRay CRD schema (made strict, as ``kubectl --validate=strict`` is), the Kubernetes
  schemas of built-in kinds, and the KubeRay operator's own rules (name, TTL).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from pipeline.cli.main import build_parser, main
from pipeline.cluster.job_paths import cluster_paths_problem
from pipeline.cluster.submit import auth_token, job_preset
from pipeline.config.presets import load_config
from pipeline.tracking.store import sqlite_artifact_root
from tests.kuberay_rules import refusal, strict_schema
from tests.mlflow_server import free_port

REPO = Path(__file__).resolve().parents[1]
CRDS_DIR = Path(os.environ.get("KUBERAY_CRDS_DIR", REPO.parent / "shared" / "kuberay-crds"))
VENV_BIN = Path(sys.executable).parent
TINY = [
    "--algo", "random", "--skip-shrinkage", "--iterations", "1", "--episodes", "2", "--quiet",
    "--set", "teacher.epochs=2", "--set", "teacher.width=0.5", "--set", "distill.steps=20",
    "--set", "finetune.steps=20", "--set", "finetune.top_k=1",
]  # fmt: skip
"""The smallest demo that goes through every step: teacher, search, fine-tuning, registry."""
README_SUBMIT = (
    "RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- "
    'python -m pipeline run --preset demo --address auto --run-dir "$PWD/runs/demo-job" '
    '--tracking-uri "sqlite:///$PWD/mlflow.db"'
)
"""The README's line (On a cluster), run here with the test head's port and TINY appended."""


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def job_cwd(root: Path) -> Path:
    """A folder shaped like Ray's unpacked working_dir copy of a job."""
    cwd = root / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    cwd.mkdir(parents=True)
    return cwd


# --------------------------------------------------------------------------- inside a Ray job


def test_paths_that_die_with_the_job_are_refused_only_inside_one(tmp_path: Path) -> None:
    cwd = job_cwd(tmp_path)
    job = {"RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}
    relative = load_config("demo", [f"output.run_dir={tmp_path / 'run'}"]).resolve_paths()
    assert relative.tracking.uri == "sqlite:///mlflow.db"
    assert cluster_paths_problem(relative, environ={}, cwd=tmp_path) is None  # a user's shell
    problem = cluster_paths_problem(relative, environ=job, cwd=tmp_path)
    assert "tracking.uri sqlite:///mlflow.db" in problem and "--tracking-uri" in problem
    # Ray's working-dir copy is recognised from the cwd alone, environment or not.
    assert cluster_paths_problem(relative, environ={}, cwd=cwd) is not None
    inside = load_config("demo", [f"output.run_dir={cwd / 'runs' / 'x'}", "tracking.enabled=false"])
    problem = cluster_paths_problem(inside.resolve_paths(), environ={}, cwd=cwd)
    assert problem.startswith(f"output.run_dir {cwd / 'runs' / 'x'} lies in Ray's temporary copy")
    assert "--run-dir" in problem
    # Absolute paths outside the copy pass, and a new experiment keeps its artifacts beside the
    # SQLite store instead of in the job's working dir (MLflow's default ./mlruns).
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    fine = load_config(
        "demo", [f"output.run_dir={tmp_path / 'run'}", f"tracking.uri=sqlite:///{db}"]
    ).resolve_paths()
    assert cluster_paths_problem(fine, environ=job, cwd=cwd) is None
    with sqlite3.connect(db) as conn:
        (location,) = conn.execute(
            "SELECT artifact_location FROM experiments WHERE name = 'n2n'"
        ).fetchone()
    assert location == sqlite_artifact_root(db, "n2n") == (db.parent / "mlruns" / "n2n").as_uri()
    # An experiment that already keeps its artifacts in a job's copy is refused, not reused.
    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE experiments SET artifact_location = ? WHERE name = 'n2n'",
            ((cwd / "mlruns" / "1").as_uri(),),
        )
    problem = cluster_paths_problem(fine, environ=job, cwd=cwd)
    assert "experiment 'n2n'" in problem and "tracking.experiment" in problem


def test_n2n_run_inside_a_job_refuses_a_relative_sqlite_store_before_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    cwd = job_cwd(tmp_path)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}}))
    ray_before = ray.is_initialized()
    code, _, err = run_cli(["run", "--run-dir", str(tmp_path / "run")], capsys)
    assert code == 2
    line = one_line(err)
    assert line.startswith("n2n run: error: tracking.uri sqlite:///mlflow.db puts the MLflow store")
    assert "deleted with the job" in line and "--tracking-uri sqlite:////" in line
    code, _, err = run_cli(["run", "--no-tracking"], capsys)  # default run dir: inside the copy
    assert code == 2 and "output.run_dir" in one_line(err) and str(cwd) in err
    assert ray.is_initialized() == ray_before
    assert not (cwd / "mlflow.db").exists() and not (cwd / "runs").exists()


# --------------------------------------------------------------------------- --address, no head


def test_token_is_found_where_ray_looks_for_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert auth_token({}, home=home) is None
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-file\n")
    assert auth_token({}, home=home) == "from-file"
    path = tmp_path / "token"
    path.write_text("from-path")
    assert auth_token({"RAY_AUTH_TOKEN_PATH": str(path)}, home=home) == "from-path"
    both = {"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(path)}
    assert auth_token(both, home=home) == "from-env"
    with pytest.raises(ValueError, match="RAY_AUTH_TOKEN_PATH"):
        auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home=home)


def test_a_preset_file_must_travel_with_the_working_dir(tmp_path: Path) -> None:
    assert job_preset("demo", REPO) == "demo"
    assert job_preset(str(REPO / "configs" / "demo.yaml"), REPO) == "configs/demo.yaml"
    outside = tmp_path / "mine.yaml"
    outside.write_text("name: mine\n")
    with pytest.raises(ValueError, match="outside .* uploaded to the cluster"):
        job_preset(str(outside), REPO)


NOWHERE = ["--address", "http://127.0.0.1:9"]  # nothing listens: a request would fail otherwise


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([*NOWHERE, "--set", "removal.iterations=0"], "'removal.iterations'"),
        ([*NOWHERE, "--preset", "dmeo"], "unknown preset 'dmeo'"),
        ([*NOWHERE, "--dry-run"], "--dry-run works with --k8s only"),
        ([], "needs a target"),
        (["--address", "127.0.0.1:8265"], "is not the job server's URL"),
    ],
)
def test_bad_input_exits_2_with_one_line_before_anything_is_sent(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    code, _, err = run_cli(["submit", "--run-dir", str(tmp_path / "r"), *argv], capsys)
    assert code == 2
    line = one_line(err)
    assert line.startswith("n2n submit: error:") and expected in line, line


def test_an_unreachable_job_server_exits_2(capsys, tmp_path: Path) -> None:
    port = free_port()
    argv = ["submit", "--address", f"http://127.0.0.1:{port}", "--run-dir", str(tmp_path / "r")]
    code, _, err = run_cli([*argv, "--no-tracking"], capsys)
    assert code == 2 and f"no Ray job server answers at http://127.0.0.1:{port}" in one_line(err)


# --------------------------------------------------------------------------- --address, real head


def _stop_group(pgid: int) -> None:
    """Stops the processes of one ``ray start`` (its own process group), TERM then KILL."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[dict[str, Any]]:
    """A real Ray head started as the README says (``ray get-auth-token --generate``, then
    ``ray start --head``, which turns token authentication on because the token file exists),
    with the job server on loopback, in a temporary HOME, on free ports and with a private temp
    dir, so that other Ray clusters on this machine and the user's token are left alone."""
    import requests

    root = Path(tempfile.mkdtemp(prefix="n2nh", dir="/tmp"))  # Ray's socket paths stay short
    home = root / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(
        HOME=str(home), RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true",
        PATH=f"{VENV_BIN}{os.pathsep}{env['PATH']}",  # as after `. .venv/bin/activate`
    )  # fmt: skip
    ray = str(VENV_BIN / "ray")
    subprocess.run([ray, "get-auth-token", "--generate"], env=env, check=True, timeout=60,
                   capture_output=True)  # fmt: skip
    token = (home / ".ray" / "auth_token").read_text().strip()
    dashboard = free_port()
    start = [
        ray, "start", "--head", "--dashboard-host", "127.0.0.1", "--num-cpus", "2",
        "--port", str(free_port()), "--dashboard-port", str(dashboard),
        "--ray-client-server-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()),
        "--temp-dir", str(root / "ray"), "--object-store-memory", str(400 * 1024**2),
    ]  # fmt: skip
    proc = subprocess.Popen(
        start, env=env, cwd=root, start_new_session=True, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out
        address = f"http://127.0.0.1:{dashboard}"
        assert requests.get(f"{address}/api/jobs/", timeout=10).status_code == 401  # auth is on
        yield {"address": address, "env": env, "home": home, "token": token, "root": root}
    finally:
        _stop_group(proc.pid)
        shutil.rmtree(root, ignore_errors=True)


def _project_copy(dest: Path) -> Path:
    """A user's checkout: the code, configs and pyproject, nothing else."""
    for name in ("pipeline", "envs", "configs"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    return dest


def _check_results(run_dir: Path, db: Path, registry_name: str) -> None:
    """The run directory and the registered model are where they were asked to be."""
    from mlflow import MlflowClient

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["student"]["params"] < summary["teacher"]["params"]
    assert (run_dir / "best" / "weights.pt").is_file()
    uri = f"sqlite:///{db}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias(registry_name, "champion")
    experiment = client.get_experiment_by_name("n2n")
    assert experiment.artifact_location == (db.parent / "mlruns" / "n2n").as_uri()
    stored = client.get_model_version_download_uri(registry_name, version.version)
    where = Path(urlsplit(stored).path)
    assert where.is_relative_to(db.parent / "mlruns" / "n2n"), stored
    assert (where / "MLmodel").is_file()  # still there after the job's session files went


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_readme_ray_job_submit_line_works_as_written(ray_head, tmp_path: Path) -> None:
    assert README_SUBMIT in (REPO / "README.md").read_text()  # the line tested is the one shown
    project = _project_copy(tmp_path / "n2n")
    line = README_SUBMIT.replace("127.0.0.1:8265", ray_head["address"].removeprefix("http://"))
    line += " " + shlex.join(TINY)
    proc = subprocess.run(
        ["bash", "-c", line], cwd=project, env=ray_head["env"], capture_output=True, text=True,
        timeout=540,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in proc.stdout + proc.stderr
    _check_results(project / "runs" / "demo-job", project / "mlflow.db", "n2n-demo")
    # Nothing was written into the job's temporary copy of the working dir.
    copies = list(ray_head["root"].glob("ray/session_*/runtime_resources/working_dir_files/*"))
    assert copies and not any((c / "mlflow.db").exists() or (c / "runs").exists() for c in copies)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_n2n_submit_address_runs_the_demo_and_keeps_its_results(
    ray_head, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The token comes from the (temporary) ~/.ray/auth_token, whatever RAY_AUTH_MODE says.
    monkeypatch.setenv("HOME", str(ray_head["home"]))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    here = tmp_path / "work"
    here.mkdir()
    monkeypatch.chdir(here)
    argv = ["submit", "--address", ray_head["address"], "--run-dir", "runs/demo", *TINY,
            "--set", "tracking.registry_name=submitted"]  # fmt: skip
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err[-3000:] + out[-3000:]
    entrypoint = next(ln for ln in err.splitlines() if "submitted job" in ln).split(": ", 2)[2]
    args = shlex.split(entrypoint)
    assert args[:4] == ["python", "-m", "pipeline", "run"] and args[-2:] == ["--address", "auto"]
    assert args[args.index("--run-dir") + 1] == str(here / "runs" / "demo")
    assert args[args.index("--tracking-uri") + 1] == f"sqlite:///{here / 'mlflow.db'}"
    build_parser().parse_args(args[3:])  # n2n's own parser accepts the job's command line
    # The job's own log, streamed (rich wraps its lines at 80 columns when not on a terminal).
    assert "run directory: " + str(here / "runs" / "demo") in re.sub(r"\s*\n", " ", out)
    _check_results(here / "runs" / "demo", here / "mlflow.db", "submitted")

    # A wrong token is refused before anything is sent.
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    code, _, err = run_cli([*argv[:-2], "--run-dir", "runs/other"], capsys)
    assert code == 2 and "token was rejected" in one_line(err)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_n2n_submit_stops_a_job_that_passes_its_deadline(
    ray_head, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head["token"])
    argv = ["submit", "--address", ray_head["address"], "--run-dir", str(tmp_path / "run"),
            "--no-tracking", *TINY, "--deadline", "3"]  # fmt: skip
    code, _, err = run_cli(argv, capsys)
    assert code == 4, err
    assert re.search(r"job n2n-demo-\S+ passed --deadline 3 s and was stopped \(STOPPED\)$", err)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_job_with_a_relative_sqlite_uri_fails_with_one_line(ray_head, tmp_path: Path) -> None:
    """``ray job submit`` without the README's absolute paths: the job fails at once."""
    project = _project_copy(tmp_path / "n2n")
    line = README_SUBMIT.replace("127.0.0.1:8265", ray_head["address"].removeprefix("http://"))
    line = line.replace('"sqlite:///$PWD/mlflow.db"', "sqlite:///mlflow.db")
    proc = subprocess.run(
        ["bash", "-c", line], cwd=project, env=ray_head["env"], capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip
    assert proc.returncode != 0
    logs = proc.stdout + proc.stderr
    assert "n2n run: error: tracking.uri sqlite:///mlflow.db puts the MLflow store" in logs, logs
    assert not (project / "runs" / "demo-job").exists()


# --------------------------------------------------------------------------- --k8s


class KubeStandIn:
    """A loopback stand-in for the Kubernetes API calls of ``n2n submit --k8s``.

    It is not Kubernetes: it stores what it is sent, answers the RayJob's reads with the
    scripted ``statuses`` in turn (the last one repeats), shows one submitter pod once the job
    runs and serves ``log`` as that pod's log. ``requests`` records (method, path, body).
    """

    def __init__(self, statuses: list[dict[str, str]], log: str = "") -> None:
        self.statuses, self.log = statuses, log
        self.requests: list[tuple[str, str, Any]] = []
        self.objects: dict[str, dict[str, Any]] = {}
        self.reads = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> KubeStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, folder: Path, namespace: str = "ml") -> Path:
        path = folder / "kubeconfig"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "me", "user": {"token": "stand-in-token"}}],
            "contexts": [{"name": "standin",
                          "context": {"cluster": "standin", "user": "me", "namespace": namespace}}],
        }))  # fmt: skip
        return path

    def sent(self, method: str, kind: str) -> list[Any]:
        return [body for m, path, body in self.requests if m == method and f"/{kind}" in path]

    def status(self) -> dict[str, str]:
        self.reads += 1
        return self.statuses[min(self.reads - 1, len(self.statuses) - 1)]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, code: int, body: Any, content: str = "application/json") -> None:
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", content)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _missing(self) -> None:
                self._reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                  "reason": "NotFound", "code": 404})  # fmt: skip

            def do_POST(self) -> None:
                path = urlsplit(self.path).path
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                standin.requests.append(("POST", path, body))
                name = body["metadata"]["name"]
                if f"{path}/{name}" in standin.objects:
                    return self._reply(
                        409, {"kind": "Status", "code": 409, "reason": "AlreadyExists"}
                    )
                body["metadata"]["uid"] = f"uid-{name}"
                standin.objects[f"{path}/{name}"] = body
                self._reply(201, body)

            def do_DELETE(self) -> None:
                path = urlsplit(self.path).path
                standin.requests.append(("DELETE", path, None))
                if standin.objects.pop(path, None) is None:
                    return self._missing()
                self._reply(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                standin.requests.append(("GET", parts.path, query))
                if "/rayjobs/" in parts.path:
                    found = standin.objects.get(parts.path)
                    if found is None:
                        return self._missing()
                    return self._reply(200, {**found, "status": standin.status()})
                if parts.path.endswith("/log"):
                    return self._reply(200, standin.log, "text/plain")
                if parts.path.endswith("/pods"):
                    name = query["labelSelector"][0].removeprefix("job-name=")
                    running = standin.reads and standin.statuses[
                        min(standin.reads - 1, len(standin.statuses) - 1)
                    ].get("jobStatus")  # fmt: skip
                    items = [{"metadata": {"name": f"{name}-x7k2p"},
                              "status": {"phase": "Running"}}] if running else []  # fmt: skip
                    return self._reply(200, {"kind": "PodList", "apiVersion": "v1",
                                             "metadata": {}, "items": items})  # fmt: skip
                self._missing()

        return Handler


@pytest.fixture(scope="module")
def rayjob_schema() -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    path = CRDS_DIR / "ray.io_rayjobs.yaml"
    if not path.is_file():
        pytest.skip(f"KubeRay CRDs not found in {CRDS_DIR}: set KUBERAY_CRDS_DIR")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(strict_schema(version["schema"]["openAPIV3Schema"]))


def check_rayjob(rayjob: dict[str, Any], schema: Any) -> None:
    """The RayJob validates against the strict CRD schema and passes the operator's checks."""
    errors = sorted(schema.iter_errors(rayjob), key=lambda e: list(e.path))
    assert not errors, "; ".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:5])
    name, spec = rayjob["metadata"]["name"], rayjob["spec"]
    assert len(name) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name
    if spec.get("ttlSecondsAfterFinished"):
        assert spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    # The operator's Go admission rules, ported (tests/kuberay_rules.py).
    assert refusal(rayjob) is None, refusal(rayjob)
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    cluster = spec["rayClusterSpec"]
    for template in [cluster["headGroupSpec"]["template"]] + [
        group["template"] for group in cluster["workerGroupSpecs"]
    ]:
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
               "template": template}  # fmt: skip
        kubernetes_validate.validate(pod, "1.33.0", strict=True)


SUCCEEDED = [
    {},
    {"jobDeploymentStatus": "Initializing"},
    {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
    {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"},
]


def _k8s(standin: KubeStandIn, folder: Path, *argv: str) -> list[str]:
    return ["submit", "--k8s", "--kubeconfig", str(standin.kubeconfig(folder)), "--poll", "0.05",
            *argv]  # fmt: skip


@pytest.mark.timeout(120)
def test_k8s_submit_creates_a_valid_rayjob_and_follows_it_to_success(
    rayjob_schema: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = "teacher small_cnn ...\nrun directory: /data/runs/x\n"
    with KubeStandIn(SUCCEEDED, log=log) as standin:
        argv = _k8s(standin, tmp_path, "--pvc", "n2n-data", "--gpus", "1", "--workers", "2",
                    "--set", "ray.gpus_per_child=0.25", "--image", "registry.example/n2n:1",
                    "--tracking-uri", "http://n2n-mlflow:5000")  # fmt: skip
        code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert log in out  # the submitter pod's log, streamed
    assert "RayJob" in err and "Running, job RUNNING" in err and "SUCCEEDED" in err.splitlines()[-1]
    (rayjob,) = standin.sent("POST", "rayjobs")
    (configmap,) = standin.sent("POST", "configmaps")
    check_rayjob(rayjob, rayjob_schema)
    name = rayjob["metadata"]["name"]
    assert rayjob["metadata"]["namespace"] == "ml"  # the kubeconfig context's namespace
    # The ConfigMap holds the validated config and goes away with its RayJob.
    pytest.importorskip("kubernetes_validate").validate(configmap, "1.33.0", strict=True)
    assert configmap["metadata"]["ownerReferences"] == [
        {"apiVersion": "ray.io/v1", "kind": "RayJob", "name": name, "uid": f"uid-{name}"}
    ]
    config = tmp_path / "config.yaml"
    config.write_text(configmap["data"]["config.yaml"])
    cfg = load_config(config)
    assert cfg.output.run_dir == f"/data/runs/{name}" and cfg.ray.gpus_per_child == 0.25
    assert cfg.tracking.uri == "http://n2n-mlflow:5000" and cfg.ray.address == "auto"
    # The entrypoint is n2n's own command line, reading the mounted config.
    args = shlex.split(rayjob["spec"]["entrypoint"])
    assert args[:4] == ["python", "-m", "pipeline", "run"]
    parsed = build_parser().parse_args(args[3:])
    assert parsed.preset == "/etc/n2n/config.yaml" and parsed.run_dir == f"/data/runs/{name}"
    assert parsed.address == "auto"
    # GPUs on the workers only; the claim on every pod; the config on the head.
    cluster = rayjob["spec"]["rayClusterSpec"]
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["replicas"] == 2
    worker_pod = workers["template"]["spec"]
    assert worker_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker_pod[
        "tolerations"
    ]
    head_pod = cluster["headGroupSpec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in head_pod["containers"][0]["resources"]["limits"]
    for pod in (head_pod, worker_pod):
        assert {"name": "shared", "mountPath": "/data"} in pod["containers"][0]["volumeMounts"]
    assert {"name": "n2n-config", "configMap": {"name": f"{name}-config"}} in head_pod["volumes"]
    assert rayjob["spec"]["ttlSecondsAfterFinished"] == 600
    # The submitter's log was read from the pod of KubeRay's submitter Job (named like the RayJob).
    logs = [p for m, p, _ in standin.requests if m == "GET" and p.endswith("/log")]
    assert logs == [f"/api/v1/namespaces/ml/pods/{name}-x7k2p/log"]


@pytest.mark.parametrize(
    ("end", "code"),
    [
        (
            {
                "jobDeploymentStatus": "Complete",
                "jobStatus": "FAILED",
                "reason": "AppFailed",
                "message": "Job entrypoint command failed with exit code 1",
            },
            1,
        ),  # fmt: skip
        ({"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"}, 3),
        (
            {
                "jobDeploymentStatus": "Failed",
                "jobStatus": "RUNNING",
                "reason": "DeadlineExceeded",
                "message": "The RayJob has passed the activeDeadlineSeconds.",
            },
            4,
        ),  # fmt: skip
    ],
)
@pytest.mark.timeout(120)
def test_k8s_submit_exits_with_the_jobs_outcome(
    end: dict[str, str], code: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    statuses = [{"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, end]
    with KubeStandIn(statuses, log="Traceback ...\n") as standin:
        argv = _k8s(standin, tmp_path, "--no-tracking", "--keep-cluster", "--deadline", "60")
        got, out, err = run_cli(argv, capsys)
    assert got == code, err
    last = err.strip().splitlines()[-1]
    assert (end.get("jobStatus") if code != 4 else "DeadlineExceeded") in last
    if end.get("message"):
        assert end["message"] in last
    (rayjob,) = standin.sent("POST", "rayjobs")
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is False and "ttlSecondsAfterFinished" not in spec
    assert spec["activeDeadlineSeconds"] == 60


def test_k8s_dry_run_prints_the_manifests_and_sends_nothing(
    rayjob_schema: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with KubeStandIn(SUCCEEDED) as standin:
        argv = _k8s(standin, tmp_path, "--dry-run", "--pvc", "shared", "--name", "my-search")
        code, out, err = run_cli(argv, capsys)
    assert code == 0 and standin.requests == []
    configmap, rayjob = yaml.safe_load_all(out)
    assert configmap["kind"] == "ConfigMap" and rayjob["metadata"]["name"] == "my-search"
    check_rayjob(rayjob, rayjob_schema)
    # A relative SQLite store is put on the claim, and the run directory too.
    config = yaml.safe_load(configmap["data"]["config.yaml"])
    assert config["tracking"]["uri"] == "sqlite:////data/mlflow.db"
    assert config["output"]["run_dir"] == "/data/runs/my-search"
    assert "sqlite:////data/mlflow.db" in err


def test_k8s_resume_continues_the_run_directory_on_the_claim(
    rayjob_schema: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with KubeStandIn(SUCCEEDED) as standin:
        argv = _k8s(standin, tmp_path, "--dry-run", "--pvc", "shared", "--resume",
                    "/data/runs/n2n-demo-1", "--tracking-uri", "http://mlflow:5000")  # fmt: skip
        code, out, err = run_cli(argv, capsys)
    assert code == 0 and standin.requests == [], err
    (rayjob,) = yaml.safe_load_all(out)  # no ConfigMap: the run directory holds the config
    check_rayjob(rayjob, rayjob_schema)
    parsed = build_parser().parse_args(shlex.split(rayjob["spec"]["entrypoint"])[3:])
    assert parsed.resume == "/data/runs/n2n-demo-1" and parsed.address == "auto"
    assert parsed.tracking_uri == "http://mlflow:5000"
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert [volume["name"] for volume in head["volumes"]] == ["shared"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], "would keep the MLflow store in the head pod"),
        (["--pvc", "d", "--tracking-uri", "sqlite:////elsewhere/m.db"], "in the head pod"),
        (["--name", "N2N"], "DNS-1035"),
        (["--name", "a" * 48], "at most 47 characters"),
        (["--no-tracking", "--pvc", "d", "--run-dir", "/tmp/run"], "not on the claim"),
        (["--no-tracking", "--set", "ray.gpus_per_child=0.5"], "--gpus is 0"),
        (["--tracking-uri", "http://me:s3cret@mlflow:5000"], "--env-secret"),
        (["--no-tracking", "--address", "http://127.0.0.1:8265"], "drop it with --k8s"),
    ],
)
def test_k8s_refusals_exit_2_with_one_line_and_send_nothing(
    argv: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with KubeStandIn(SUCCEEDED) as standin:
        code, _, err = run_cli(_k8s(standin, tmp_path, *argv), capsys)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and expected in errors[0], err
    assert standin.requests == []


def test_k8s_delete_removes_the_rayjob_and_its_configmap(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with KubeStandIn(SUCCEEDED) as standin:
        created = _k8s(standin, tmp_path, "--no-tracking", "--no-wait", "--name", "search-1")
        assert run_cli(created, capsys)[0] == 0
        code, _, err = run_cli(_k8s(standin, tmp_path, "--delete", "search-1"), capsys)
        assert code == 0 and "deleted RayJob search-1" in err
        assert standin.objects == {}
        code, _, err = run_cli(_k8s(standin, tmp_path, "--delete", "search-1"), capsys)
    assert code == 2 and "no RayJob search-1 in namespace ml" in one_line(err)
    deletes = [p for m, p, _ in standin.requests if m == "DELETE"]
    assert deletes[:2] == [
        "/apis/ray.io/v1/namespaces/ml/rayjobs/search-1",
        "/api/v1/namespaces/ml/configmaps/search-1-config",
    ]
