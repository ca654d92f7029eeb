"""The Kubernetes side: the Helm chart in helm/n2n and the plain manifests in k8s/.

No Kubernetes API server can run here (none in any reachable registry, no container engine), so
nothing is applied to a cluster. Instead every check runs offline against the real things that
can run: Helm's own template engine and linter (the Helm SDK through ``helm_python``), the
KubeRay CRDs' OpenAPI schemas (RayJob, RayCluster) with ``jsonschema``, the Kubernetes API
schemas of built-in kinds with ``kubernetes-validate``, n2n's own command-line parser and config
model for the RayJob entrypoint, and a real ``mlflow server`` on loopback started with the
arguments the chart renders. CRD schemas are made strict (unknown fields rejected, as
``kubectl apply --validate=strict`` does) so that a misspelt field fails here rather than being
silently dropped by the API server.

The KubeRay CRDs are data outside the repository: ``KUBERAY_CRDS_DIR`` (default
``../shared/kuberay-crds`` beside the checkout) holds ``ray.io_rayjobs.yaml`` and
``ray.io_rayclusters.yaml``; when they are absent one test skips, saying so, and the others
run everything but the CRD validation.
"""

from __future__ import annotations

import copy
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

helm_python = pytest.importorskip(
    "helm_python", reason="helm-python-sdk (Helm's engine) is not installed: pip install '.[test]'"
)
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed: pip install '.[test]'"
)
jsonschema = pytest.importorskip("jsonschema")

from pipeline.cli import build_parser, config_from_args  # noqa: E402
from pipeline.config import validate_config  # noqa: E402
from tests.mlflow_server import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "n2n"
PLAIN = ROOT / "k8s"
CRDS_DIR = Path(
    os.environ.get(
        "KUBERAY_CRDS_DIR", Path(__file__).resolve().parents[2] / "shared" / "kuberay-crds"
    )
)
KUBE_VERSION = "1.33.0"  # built-in kinds are checked against this Kubernetes API version
NAMESPACE = "ml"
FAKE_SECRET = "FAKEs3cretKEY/do-not-render-9f8e7d"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}


# --------------------------------------------------------------------------- helpers


def render(values: dict[str, Any] | None = None, name: str = "n2n") -> dict[str, str]:
    """Renders the chart with Helm's engine: {template path: YAML text}."""
    return helm_python.Chart.load(str(CHART)).render(values or {}, name=name, namespace=NAMESPACE)


def objects(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """All Kubernetes objects in a rendering (NOTES.txt and empty templates left out)."""
    out = []
    for path, text in rendered.items():
        if path.endswith(".yaml"):
            out += [doc for doc in yaml.safe_load_all(text) if doc]
    return out


def by_kind(objs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for obj in objs:
        kinds.setdefault(obj["kind"], []).append(obj)
    return kinds


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objs).get(kind, [])
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def gpu_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "ci" / "gpu-values.yaml").read_text())


def cluster_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]


def containers(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every container of every workload, keyed by container name."""
    out = {}
    for obj in objs:
        if obj["kind"] in ("RayJob", "RayCluster"):
            spec = cluster_spec(obj)
            pods = [spec["headGroupSpec"]["template"]]
            pods += [group["template"] for group in spec.get("workerGroupSpecs", [])]
            if obj["kind"] == "RayJob" and "submitterPodTemplate" in obj["spec"]:
                pods.append(obj["spec"]["submitterPodTemplate"])
        elif obj["kind"] == "Deployment":
            pods = [obj["spec"]["template"]]
        else:
            continue
        for pod in pods:
            for container in pod["spec"]["containers"]:
                out[container["name"]] = container
    return out


def entrypoint_args(rayjob: dict[str, Any]) -> list[str]:
    return shlex.split(rayjob["spec"]["entrypoint"])


def set_flags(args: list[str]) -> list[str]:
    return [args[i + 1] for i, arg in enumerate(args) if arg == "--set"]


def mlflow_allowed_hosts(deployment: dict[str, Any]) -> list[str]:
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    return args[args.index("--allowed-hosts") + 1].split(",")


# --------------------------------------------------------------------------- schemas


def _strict(schema: Any) -> Any:
    """A copy of a CRD schema that rejects unknown fields where the API server would prune them."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
        and out["properties"].keys() - {"apiVersion", "kind", "metadata"}
    ):
        out["additionalProperties"] = False
    return out


def _missing_crds() -> list[str]:
    return [name for name in CRD_FILES.values() if not (CRDS_DIR / name).is_file()]


@pytest.fixture(scope="module")
def crd_validators() -> dict[str, Any]:
    """Strict jsonschema validators of RayJob and RayCluster (ray.io/v1), from the CRD files.

    Empty when the CRDs are absent: the other checks of a test still run, and
    ``test_kuberay_crds_are_there_to_validate_against`` reports the skip.
    """
    if _missing_crds():
        return {}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    validators = {}
    for kind, name in CRD_FILES.items():
        crd = yaml.load((CRDS_DIR / name).read_text(), Loader=loader)
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schema = _strict(version["schema"]["openAPIV3Schema"])
        validators[kind] = jsonschema.Draft7Validator(schema)
    return validators


def test_kuberay_crds_are_there_to_validate_against(crd_validators: dict[str, Any]) -> None:
    missing = _missing_crds()
    if missing:
        pytest.skip(
            f"KubeRay CRDs {missing} not found in {CRDS_DIR}, so RayJob/RayCluster are not "
            "validated: set KUBERAY_CRDS_DIR to a folder with the CRDs of your KubeRay release "
            "(helm-chart/kuberay-operator/crds upstream)"
        )
    assert sorted(crd_validators) == ["RayCluster", "RayJob"]
    # The strict copy rejects a misspelt field that the API server would silently drop.
    typo = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {}, "spec": {"entrypont": "x"}}
    assert not crd_validators["RayJob"].is_valid(typo)


def validate_all(objs: list[dict[str, Any]], crd_validators: dict[str, Any]) -> None:
    """Validates RayJob/RayCluster against the CRDs and built-in kinds against Kubernetes'."""
    for obj in objs:
        kind, name = obj["kind"], obj["metadata"]["name"]
        if kind not in ("RayJob", "RayCluster"):
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
            continue
        # Pod templates inside the CRDs against the Kubernetes PodTemplate schema.
        for pod_template in _pod_templates(obj):
            kubernetes_validate.validate(pod_template, KUBE_VERSION, strict=True)
        if kind not in crd_validators:
            continue  # no CRDs here: test_kuberay_crds_are_there_to_validate_against skips
        errors = sorted(crd_validators[kind].iter_errors(obj), key=lambda e: list(e.path))
        assert not errors, f"{kind} {name}: " + "; ".join(
            f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:5]
        )
        if kind == "RayJob":  # the embedded cluster must also stand as a RayCluster
            cluster = {
                "apiVersion": "ray.io/v1",
                "kind": "RayCluster",
                "metadata": {"name": name},
                "spec": obj["spec"]["rayClusterSpec"],
            }
            crd_validators["RayCluster"].validate(cluster)


def _pod_templates(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = cluster_spec(obj)
    templates = [spec["headGroupSpec"]["template"]]
    templates += [group["template"] for group in spec.get("workerGroupSpecs", [])]
    if obj["kind"] == "RayJob" and "submitterPodTemplate" in obj["spec"]:
        templates.append(obj["spec"]["submitterPodTemplate"])
    return [
        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": t}
        for t in templates
    ]


# --------------------------------------------------------------------------- chart: lint, render


@pytest.mark.parametrize("values_name", ["defaults", "gpu"])
def test_chart_lints_strict(values_name: str) -> None:
    values = gpu_values() if values_name == "gpu" else {}
    report = helm_python.lint(str(CHART), values, strict=True)
    assert report["errors"] == [], report
    # Severity 1 is INFO (Helm suggests an icon); warnings (2) and errors (3) fail strict lint.
    assert all(m["severity"] <= 1 for m in report["messages"]), report["messages"]


def test_defaults_render_valid_cpu_only_rayjob_and_mlflow(crd_validators: dict[str, Any]) -> None:
    objs = objects(render())
    validate_all(objs, crd_validators)
    kinds = by_kind(objs)
    assert sorted(kinds) == ["Deployment", "PersistentVolumeClaim", "RayJob", "Service"]

    rayjob = one(objs, "RayJob")
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
    assert spec["backoffLimit"] == 0
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}

    args = entrypoint_args(rayjob)
    assert args[:4] == ["n2n", "run", "--preset", "fashion-mnist-resnet18"]
    service = one(objs, "Service")
    port = service["spec"]["ports"][0]["port"]
    assert args[args.index("--tracking-uri") + 1] == f"http://{service['metadata']['name']}:{port}"
    assert args[args.index("--address") + 1] == "auto"
    assert set_flags(args) == []  # nothing overrides the preset unless asked

    # No GPU anywhere unless asked for: no limit, no toleration.
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(objs)
    worker_pod = spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert "tolerations" not in worker_pod

    for name, container in containers(objs).items():
        resources = container.get("resources", {})
        assert resources.get("requests") and resources.get("limits"), f"{name} has no resources"
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, name


def test_gpu_values_add_gpu_limits_tolerations_and_fractional_children(
    crd_validators: dict[str, Any],
) -> None:
    values = gpu_values()
    objs = objects(render(values))
    validate_all(objs, crd_validators)
    spec = one(objs, "RayJob")["spec"]["rayClusterSpec"]

    worker = spec["workerGroupSpecs"][0]
    pod = worker["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == values["ray"]["workers"]["gpus"]
    assert container["resources"]["limits"]["cpu"] == "8"  # user limits kept beside the GPU
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert (worker["minReplicas"], worker["maxReplicas"]) == (0, 8)
    assert spec["enableInTreeAutoscaling"] is True

    head = spec["headGroupSpec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]
    assert "tolerations" not in head

    sets = set_flags(entrypoint_args(one(objs, "RayJob")))
    assert "ray.gpus_per_child=0.25" in sets and "ray.cpus_per_child=2" in sets
    # The chart's own keys come first, then the user's overrides in their order.
    assert sets[-2:] == values["job"]["overrides"]
    # The shared volume is mounted where run_dir points, on head and workers alike.
    for pod_spec in (head, pod):
        mounts = pod_spec["containers"][0]["volumeMounts"]
        assert {"name": "shared", "mountPath": "/mnt/n2n"} in mounts
        assert pod_spec["volumes"][-1]["persistentVolumeClaim"]["claimName"] == "n2n-shared"


@pytest.mark.parametrize("values_name", ["defaults", "gpu", "teacher", "quoting"])
def test_entrypoint_is_accepted_by_the_n2n_command_line(values_name: str) -> None:
    """The rendered entrypoint parses with n2n's real parser and its config validates."""
    values = {
        "defaults": {},
        "gpu": gpu_values(),
        "teacher": {"job": {"command": "teacher", "preset": "demo"}},
        "quoting": {
            "tracking": {"experiment": "it's a test; rm -rf /"},
            "job": {"overrides": ["distill.steps=5", "reward.name=n2n"]},
        },
    }[values_name]
    args = entrypoint_args(one(objects(render(values)), "RayJob"))
    assert args[0] == "n2n"
    parsed = build_parser().parse_args(args[1:])
    cfg = config_from_args(parsed)
    assert cfg.ray.address == "auto"
    assert cfg.tracking.uri == "http://n2n-mlflow:5000"
    if values_name == "gpu":
        assert cfg.ray.gpus_per_child == 0.25 and cfg.ray.cpus_per_child == 2.0
        assert cfg.output.run_dir == "/mnt/n2n/runs/cifar10-resnet18"
    if values_name == "quoting":
        # Shell metacharacters stay inside one argument: quoted, never executed.
        assert cfg.tracking.experiment == "it's a test; rm -rf /"
        assert cfg.distill.steps == 5


def test_inline_config_goes_through_a_configmap(crd_validators: dict[str, Any]) -> None:
    config = {"name": "mine", "data": {"name": "digits"}, "removal": {"iterations": 2}}
    objs = objects(render({"job": {"config": config}}))
    validate_all(objs, crd_validators)
    configmap = one(objs, "ConfigMap")
    assert validate_config(yaml.safe_load(configmap["data"]["config.yaml"])).name == "mine"
    rayjob = one(objs, "RayJob")
    args = entrypoint_args(rayjob)
    assert args[args.index("--preset") + 1] == "/etc/n2n/config.yaml"
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["volumes"][0]["configMap"]["name"] == configmap["metadata"]["name"]
    assert head["containers"][0]["volumeMounts"][0]["mountPath"] == "/etc/n2n"


def test_standalone_raycluster_for_ray_job_submit(crd_validators: dict[str, Any]) -> None:
    values = {"job": {"enabled": False}, "ray": {"auth": {"existingSecret": "n2n-ray-token"}}}
    rendered = render(values)
    objs = objects(rendered)
    validate_all(objs, crd_validators)
    assert "RayJob" not in by_kind(objs)
    cluster = one(objs, "RayCluster")
    assert cluster["spec"]["authOptions"] == {"mode": "token", "secretName": "n2n-ray-token"}
    notes = rendered["n2n/templates/NOTES.txt"]
    assert "kubectl -n ml port-forward svc/n2n-head-svc 8265:8265" in notes
    assert "ray job submit --address http://localhost:8265 --working-dir . -- n2n run" in notes
    assert "get secret n2n-ray-token" in notes


def test_notes_say_how_to_open_mlflow_and_follow_the_job() -> None:
    notes = render(name="demo")["n2n/templates/NOTES.txt"]
    assert "kubectl -n ml port-forward svc/demo-n2n-mlflow 5000:5000" in notes
    assert "http://localhost:5000" in notes
    assert "kubectl -n ml get rayjob demo-n2n -w" in notes
    assert "kubectl -n ml logs -f job/demo-n2n" in notes


def test_external_tracking_server_replaces_the_chart_mlflow(crd_validators: dict[str, Any]) -> None:
    values = {
        "mlflow": {"enabled": False},
        "tracking": {"uri": "https://mlflow.example.com", "existingSecret": "mlflow-creds"},
    }
    objs = objects(render(values))
    validate_all(objs, crd_validators)
    assert sorted(by_kind(objs)) == ["RayJob"]
    args = entrypoint_args(one(objs, "RayJob"))
    assert args[args.index("--tracking-uri") + 1] == "https://mlflow.example.com"
    head = containers(objs)["ray-head"]
    assert {"secretRef": {"name": "mlflow-creds"}} in head["envFrom"]


# --------------------------------------------------------------------------- chart: bad values


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            {"ray": {"workers": {"replicas": "two"}}},
            "/ray/workers/replicas': got string, want integer",
        ),
        ({"mlflow": {"service": {"port": 70000}}}, "/mlflow/service/port"),
        ({"job": {"preset": "demo; rm -rf /"}}, "/job/preset"),
        ({"job": {"overrides": ["iterations 3"]}}, "/job/overrides/0"),
        ({"job": {"command": "train"}}, "/job/command"),
        ({"replicas": 3}, "additional properties 'replicas' not allowed"),
        (
            {"ray": {"gpusPerChild": 0.25}},
            "ray.gpusPerChild=0.25 asks for GPUs but ray.workers.gpus=0",
        ),
        ({"ray": {"workers": {"minReplicas": 3, "replicas": 1}}}, "minReplicas <= replicas"),
        ({"mlflow": {"enabled": False}}, "set tracking.uri"),
    ],
)
def test_bad_values_fail_with_a_message_naming_the_value(
    values: dict[str, Any], expected: str
) -> None:
    with pytest.raises(helm_python.HelmError) as err:
        render(values)
    assert expected in str(err.value)


# --------------------------------------------------------------------------- chart: secrets


def test_s3_keys_are_only_referenced_never_rendered(crd_validators: dict[str, Any]) -> None:
    # A secret in values is refused outright, and the refusal does not echo it.
    for where in ({"s3": {"secretAccessKey": FAKE_SECRET}}, {"mlflow": {"s3Key": FAKE_SECRET}}):
        with pytest.raises(helm_python.HelmValuesError) as err:
            render(where)
        assert FAKE_SECRET not in str(err.value)
        assert "additional properties" in str(err.value)

    values = {
        "s3": {"existingSecret": "n2n-s3", "endpointUrl": "http://minio:9000", "region": "eu-1"},
        "mlflow": {
            "artifactsDestination": "s3://bucket/n2n",
            "backendStoreSecret": {"name": "mlflow-db", "key": "uri"},
        },
        "output": {"storagePath": "s3://bucket/tune"},
    }
    rendered = render(values)
    objs = objects(rendered)
    validate_all(objs, crd_validators)
    for name, container in containers(objs).items():
        if name == "ray-job-submitter":
            continue
        assert {"secretRef": {"name": "n2n-s3"}} in container["envFrom"], name
        env = {e["name"]: e for e in container["env"]}
        assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio:9000", name
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            assert key not in env, f"{name} sets {key} inline"
    mlflow = containers(objs)["mlflow"]
    assert "--backend-store-uri" not in mlflow["args"]
    uri_env = {e["name"]: e for e in mlflow["env"]}["MLFLOW_BACKEND_STORE_URI"]
    assert uri_env["valueFrom"] == {"secretKeyRef": {"name": "mlflow-db", "key": "uri"}}
    assert "Secret" not in by_kind(objs)  # the chart never creates one


def test_values_yaml_documents_every_value() -> None:
    """Every value (or the block it belongs to) has a `# --` comment, as KubeRay's charts do."""
    undocumented = []
    stack: list[tuple[int, str, bool]] = []  # (indent, key, documented)
    comment = False
    for line in (CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            comment = True
            continue
        if not stripped or stripped.startswith("#") or stripped.startswith("- "):
            continue
        indent = len(line) - len(line.lstrip())
        key, _, rest = stripped.partition(":")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        inside_documented = any(documented for _, _, documented in stack)
        if rest.strip() and not comment and not inside_documented:
            undocumented.append(".".join([k for _, k, _ in stack] + [key]))
        stack.append((indent, key, comment or inside_documented))
        comment = False
    assert undocumented == []


# --------------------------------------------------------------------------- MLflow Host header


@pytest.mark.parametrize("source", ["chart", "plain"])
def test_mlflow_allows_its_service_names_and_localhost_only(source: str) -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    objs = objects(render()) if source == "chart" else plain_objects()
    service = next(o for o in objs if o["kind"] == "Service")
    deployment = next(o for o in objs if o["kind"] == "Deployment")
    svc, port = service["metadata"]["name"], service["spec"]["ports"][0]["port"]
    hosts = mlflow_allowed_hosts(deployment)
    assert svc in hosts
    for host in (
        f"{svc}:{port}",
        f"{svc}.{NAMESPACE}.svc:{port}",
        f"{svc}.{NAMESPACE}.svc.cluster.local:{port}",
        "localhost:5000",  # kubectl port-forward
        "127.0.0.1:5000",
    ):
        assert is_allowed_host_header(hosts, host), host
    for host in ("evil.example.com:5000", f"{svc}.evil.example.com:{port}", "10.0.0.7:5000"):
        assert not is_allowed_host_header(hosts, host), host


@pytest.mark.timeout(180)
def test_rendered_mlflow_command_runs_and_enforces_allowed_hosts(tmp_path: Path) -> None:
    """Starts `mlflow server` with the chart's own arguments (paths and port moved to loopback)."""
    deployment = one(objects(render()), "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    port = free_port()
    args = [arg.replace("/data", str(tmp_path)) for arg in container["args"]]
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--port") + 1] = str(port)
    env = dict(os.environ)
    env.update({e["name"]: e["value"] for e in container["env"] if "value" in e})
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    command = [sys.executable, "-m", *container["command"], *args]
    assert command[2:4] == ["mlflow", "server"]
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                # The probe path answers whatever the Host header (kubelet uses the pod IP).
                health = requests.get(f"{url}/health", headers={"Host": "10.1.2.3:5000"}, timeout=2)
                if health.status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer /health"
            time.sleep(0.25)
        api = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        for host, status in [
            ("n2n-mlflow:5000", 200),
            (f"n2n-mlflow.{NAMESPACE}.svc.cluster.local:5000", 200),
            ("localhost:5000", 200),
            ("evil.example.com:5000", 403),
        ]:
            answer = requests.get(api, headers={"Host": host}, timeout=10)
            assert answer.status_code == status, (host, answer.status_code, answer.text[:200])
        # The SQLite store landed where the volume is mounted.
        assert (tmp_path / "mlflow.db").is_file()
    finally:
        os.killpg(os.getpgid(proc.pid), 15)
        proc.wait(timeout=30)
        log.close()


# --------------------------------------------------------------------------- plain manifests


def plain_objects() -> list[dict[str, Any]]:
    objs = []
    for path in sorted(PLAIN.glob("*.yaml")):
        objs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return objs


def test_plain_manifests_validate(crd_validators: dict[str, Any]) -> None:
    objs = plain_objects()
    validate_all(objs, crd_validators)
    assert sorted(o["kind"] for o in objs) == [
        "Deployment",
        "PersistentVolumeClaim",
        "RayCluster",
        "RayJob",
        "Service",
    ]


def test_plain_rayjob_runs_the_preset_on_gpu_workers_and_logs_to_the_service() -> None:
    objs = plain_objects()
    rayjob = one(objs, "RayJob")
    service = one(objs, "Service")
    args = entrypoint_args(rayjob)
    expected = "n2n run --preset fashion-mnist-resnet18 --address auto --tracking-uri"
    assert " ".join(args).startswith(expected)
    uri = f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert args[args.index("--tracking-uri") + 1] == uri
    cfg = config_from_args(build_parser().parse_args(args[1:]))
    assert cfg.ray.gpus_per_child == 0.25 and cfg.tracking.uri == uri

    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] == 0
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
    for obj in (rayjob, one(objs, "RayCluster")):
        cluster = cluster_spec(obj)
        assert cluster["enableInTreeAutoscaling"] is True
        head = cluster["headGroupSpec"]["template"]["spec"]
        assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]
        worker = cluster["workerGroupSpecs"][0]
        assert worker["minReplicas"] < worker["maxReplicas"]
        pod = worker["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
            "tolerations"
        ]
    for name, container in containers(objs).items():
        assert container["resources"]["requests"] and container["resources"]["limits"], name

    deployment = one(objs, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_plain_manifests_match_the_chart_where_they_should() -> None:
    """The plain RayJob is the chart's GPU rendering written out by hand: keep them in step."""
    values = {
        "fullnameOverride": "n2n",
        "ray": {
            "workers": {
                "gpus": 1,
                "resources": copy.deepcopy(
                    one(plain_objects(), "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0][
                        "template"
                    ]["spec"]["containers"][0]["resources"]
                ),
            },
            "gpusPerChild": 0.25,
        },
    }
    values["ray"]["workers"]["resources"]["limits"].pop("nvidia.com/gpu")
    chart_job = one(objects(render(values)), "RayJob")
    plain_job = one(plain_objects(), "RayJob")
    assert chart_job["spec"]["entrypoint"] == plain_job["spec"]["entrypoint"]
    for key in ("shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "activeDeadlineSeconds"):
        assert chart_job["spec"][key] == plain_job["spec"][key], key
    chart_worker = chart_job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    plain_worker = plain_job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert chart_worker["tolerations"] == plain_worker["tolerations"]
    assert chart_worker["containers"][0]["resources"] == plain_worker["containers"][0]["resources"]
    assert chart_worker["securityContext"] == plain_worker["securityContext"]
