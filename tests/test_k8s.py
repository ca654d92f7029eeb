"""The Kubernetes side: the Helm chart in helm/n2n and the plain manifests in k8s/.

No Kubernetes API server can run here (none in any reachable registry, no container engine), so
nothing is applied to a cluster. Instead every check runs offline against the real things that
can run: Helm's own template engine and linter (the Helm SDK through ``helm_python``), the
KubeRay CRDs' OpenAPI schemas (RayJob, RayCluster) with ``jsonschema``, the Kubernetes API
schemas of built-in kinds with ``kubernetes-validate``, the KubeRay operator's own admission rules
(``tests/kuberay_rules.py``, ported from its Go code: a RayJob can pass the CRD schema and still
be refused), n2n's own command-line parser and config model for the RayJob entrypoint, and a real
``mlflow server`` on loopback started with the arguments, login settings and Secret the chart
renders. CRD schemas are made strict (unknown fields rejected, as
``kubectl apply --validate=strict`` does) so that a misspelt field fails here rather than being
silently dropped by the API server.

The KubeRay CRDs are data outside the repository: ``KUBERAY_CRDS_DIR`` (default
``../shared/kuberay-crds`` beside the checkout) holds ``ray.io_rayjobs.yaml`` and
``ray.io_rayclusters.yaml``; when they are absent one test skips, saying so, and the others
run everything but the CRD validation.
"""

from __future__ import annotations

import base64
import copy
import os
import re
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

from pipeline.cli.main import build_parser  # noqa: E402
from pipeline.config.flags import config_from_args  # noqa: E402
from pipeline.config.presets import validate_config  # noqa: E402
from tests.kuberay_rules import refusal, strict_schema  # noqa: E402
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
        schema = strict_schema(version["schema"]["openAPIV3Schema"])
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
    """Validates built-in kinds against Kubernetes' schemas, and RayJob/RayCluster against the
    CRDs and the KubeRay operator's own rules."""
    for obj in objs:
        kind, name = obj["kind"], obj["metadata"]["name"]
        if kind not in ("RayJob", "RayCluster"):
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
            continue
        assert refusal(obj) is None, f"KubeRay refuses {kind} {name}: {refusal(obj)}"
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
    kinds = {kind: len(items) for kind, items in by_kind(objs).items()}
    assert kinds == {
        "ConfigMap": 1,  # MLflow's basic-auth settings
        "Deployment": 1,
        "NetworkPolicy": 2,  # MLflow's port, the Ray pods
        "PersistentVolumeClaim": 2,  # MLflow's data, the shared results volume
        "RayJob": 1,
        "Secret": 1,  # MLflow's generated admin login
        "Service": 1,
    }

    rayjob = one(objs, "RayJob")
    spec = rayjob["spec"]
    # KubeRay deletes the cluster an hour after a success and keeps a failed one a day; it
    # refuses a TTL without shutdownAfterJobFinishes, so none is rendered.
    assert spec["shutdownAfterJobFinishes"] is False and "ttlSecondsAfterFinished" not in spec
    rules = {
        (r["condition"].get("jobStatus") or r["condition"]["jobDeploymentStatus"]): r
        for r in spec["deletionStrategy"]["deletionRules"]
    }
    assert rules["SUCCEEDED"]["condition"]["ttlSeconds"] == 3600
    assert rules["FAILED"]["condition"]["ttlSeconds"] == rules["Failed"]["condition"]["ttlSeconds"]
    assert rules["FAILED"]["condition"]["ttlSeconds"] >= 86400
    assert {r["policy"] for r in rules.values()} == {"DeleteCluster"}
    assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] == 0
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}

    args = entrypoint_args(rayjob)
    assert args[:4] == ["n2n", "run", "--preset", "fashion-mnist-resnet18"]
    service = one(objs, "Service")
    port = service["spec"]["ports"][0]["port"]
    assert args[args.index("--tracking-uri") + 1] == f"http://{service['metadata']['name']}:{port}"
    assert args[args.index("--address") + 1] == "auto"
    # Run directory and Tune storage on the shared volume, named after the release.
    assert args[args.index("--run-dir") + 1] == "/mnt/n2n/runs/n2n"
    assert args[args.index("--storage-path") + 1] == "/mnt/n2n/runs/n2n/tune"
    assert set_flags(args) == []  # nothing overrides the preset unless asked

    cluster = spec["rayClusterSpec"]
    # The head runs the driver and takes no Ray work; children and trials go to the workers.
    assert cluster["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0"}
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert sorted(groups) == ["cpu-workers", "workers"]
    # No GPU anywhere unless asked for: no limit, no toleration.
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(objs)
    assert all("tolerations" not in g["template"]["spec"] for g in groups.values())

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

    # A CPU group beside the GPU group, without GPU limits or the GPU toleration.
    cpu_pod = spec["workerGroupSpecs"][1]["template"]["spec"]
    assert spec["workerGroupSpecs"][1]["groupName"] == "cpu-workers"
    assert "nvidia.com/gpu" not in cpu_pod["containers"][0]["resources"]["limits"]
    assert "tolerations" not in cpu_pod

    args = entrypoint_args(one(objs, "RayJob"))
    sets = set_flags(args)
    assert "ray.gpus_per_child=0.25" in sets and "ray.cpus_per_child=2" in sets
    # The chart's own keys come first, then the user's overrides in their order.
    assert sets[-2:] == values["job"]["overrides"]
    assert args[args.index("--run-dir") + 1] == values["output"]["runDir"]
    # The existing claim is mounted where run_dir points, on head and workers alike, and the
    # chart makes no claim of its own.
    assert [o["metadata"]["name"] for o in by_kind(objs)["PersistentVolumeClaim"]] == ["n2n-mlflow"]
    for pod_spec in (head, pod, cpu_pod):
        mounts = pod_spec["containers"][0]["volumeMounts"]
        assert {"name": "shared", "mountPath": "/mnt/n2n"} in mounts
        volumes = {v["name"]: v for v in pod_spec["volumes"]}
        assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == "n2n-shared"


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


def test_results_outlive_the_job_on_a_shared_volume(crd_validators: dict[str, Any]) -> None:
    objs = objects(render())
    claims = {o["metadata"]["name"]: o for o in by_kind(objs)["PersistentVolumeClaim"]}
    results = claims["n2n-results"]
    # Head and workers on different nodes mount it; `helm uninstall` leaves it (and the runs).
    assert results["spec"]["accessModes"] == ["ReadWriteMany"]
    assert results["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    cluster = one(objs, "RayJob")["spec"]["rayClusterSpec"]
    for pod in [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]:
        spec = pod["template"]["spec"]
        assert {"name": "shared", "mountPath": "/mnt/n2n"} in spec["containers"][0]["volumeMounts"]
        claim = {v["name"]: v for v in spec["volumes"]}["shared"]["persistentVolumeClaim"]
        assert claim == {"claimName": "n2n-results"}
    notes = render()["n2n/templates/NOTES.txt"]
    assert "go to /mnt/n2n/runs/n2n on PersistentVolumeClaim n2n-results" in notes
    assert "helm upgrade n2n <chart> -n ml --reuse-values --set job.resume=true" in notes

    # Off: no volume. n2n refuses a relative run directory inside a Ray job (it dies with the
    # cluster), so the chart wants an absolute one, and the notes say where results end up.
    with pytest.raises(helm_python.HelmError, match="keep sharedVolume.enabled=true"):
        render({"sharedVolume": {"enabled": False}})
    rendered = render({"sharedVolume": {"enabled": False}, "output": {"runDir": "/home/ray/run"}})
    objs = objects(rendered)
    validate_all(objs, crd_validators)
    assert [o["metadata"]["name"] for o in by_kind(objs)["PersistentVolumeClaim"]] == ["n2n-mlflow"]
    args = entrypoint_args(one(objs, "RayJob"))
    assert args[args.index("--run-dir") + 1] == "/home/ray/run"
    assert "shared" not in yaml.safe_dump_all(objs)
    assert "they go with the head pod" in rendered["n2n/templates/NOTES.txt"]

    # S3 for Tune storage: the run directory stays on the volume, checkpoints go to S3.
    args = entrypoint_args(
        one(objects(render({"output": {"storagePath": "s3://b/tune"}})), "RayJob")
    )
    assert args[args.index("--storage-path") + 1] == "s3://b/tune"
    assert args[args.index("--run-dir") + 1] == "/mnt/n2n/runs/n2n"


def test_resume_continues_the_run_directory_on_the_shared_volume(
    tmp_path: Path, crd_validators: dict[str, Any]
) -> None:
    """`job.resume` runs `n2n run --resume <run dir>`, which n2n accepts for a real run dir."""
    run_dir = tmp_path / "runs" / "n2n"
    first = entrypoint_args(one(objects(render({"output": {"runDir": str(run_dir)}})), "RayJob"))
    cfg = config_from_args(build_parser().parse_args(first[1:]))
    # What the interrupted run left on the volume: its resolved config.
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(cfg.resolve_paths().to_yaml())

    objs = objects(render({"output": {"runDir": str(run_dir)}, "job": {"resume": True}}))
    validate_all(objs, crd_validators)
    args = entrypoint_args(one(objs, "RayJob"))
    assert args[:4] == ["n2n", "run", "--resume", str(run_dir)]
    assert "--preset" not in args and set_flags(args) == []
    resumed = config_from_args(build_parser().parse_args(args[1:]))
    assert resumed.output.run_dir == str(run_dir)
    assert resumed.tracking.uri == "http://n2n-mlflow:5000" and resumed.ray.address == "auto"
    # By default the run directory is the release's folder on the shared volume.
    default = entrypoint_args(one(objects(render({"job": {"resume": True}})), "RayJob"))
    assert default[2:4] == ["--resume", "/mnt/n2n/runs/n2n"]


def test_inline_config_goes_through_a_configmap(crd_validators: dict[str, Any]) -> None:
    config = {"name": "mine", "data": {"name": "digits"}, "removal": {"iterations": 2}}
    objs = objects(render({"job": {"config": config}}))
    validate_all(objs, crd_validators)
    configmap = next(o for o in objs if o["kind"] == "ConfigMap" and "config.yaml" in o["data"])
    assert validate_config(yaml.safe_load(configmap["data"]["config.yaml"])).name == "mine"
    rayjob = one(objs, "RayJob")
    args = entrypoint_args(rayjob)
    assert args[args.index("--preset") + 1] == "/etc/n2n/config.yaml"
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head["volumes"]}
    assert volumes["n2n-config"]["configMap"]["name"] == configmap["metadata"]["name"]
    mounts = {m["name"]: m for m in head["containers"][0]["volumeMounts"]}
    assert mounts["n2n-config"]["mountPath"] == "/etc/n2n"


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
    assert sorted(by_kind(objs)) == ["NetworkPolicy", "PersistentVolumeClaim", "RayJob"]
    args = entrypoint_args(one(objs, "RayJob"))
    assert args[args.index("--tracking-uri") + 1] == "https://mlflow.example.com"
    head = containers(objs)["ray-head"]
    assert {"secretRef": {"name": "mlflow-creds"}} in head["envFrom"]
    # The external server's credentials come from its Secret, not from the chart's login.
    assert not {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} & {
        e["name"] for e in head["env"]
    }


# --------------------------------------------------------------------------- chart: bad values


def _rule(policy: str, job_status: str, ttl: int) -> dict[str, Any]:
    return {"policy": policy, "condition": {"jobStatus": job_status, "ttlSeconds": ttl}}


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
        ({"ray": {"cpuWorkers": {"minReplicas": 2}}}, "ray.cpuWorkers needs minReplicas"),
        ({"ray": {"cpuWorkers": {"groupName": "workers"}}}, "each worker group needs its own"),
        ({"mlflow": {"enabled": False}}, "set tracking.uri"),
        # What KubeRay v1.7 refuses although the CRD schema takes it (tests/kuberay_rules.py).
        (
            {"job": {"ttlSecondsAfterFinished": 3600}},
            "job.ttlSecondsAfterFinished=3600 only applies with job.shutdownAfterJobFinishes=true",
        ),
        (
            {"job": {"shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 600}},
            "set job.deletionStrategy=null to delete by the TTL",
        ),
        ({"fullnameOverride": "n" * 48}, "has 48 characters and KubeRay refuses more than 47"),
        ({"fullnameOverride": "1n2n"}, "/fullnameOverride"),
        (
            {"job": {"deletionStrategy": {"deletionRules": [_rule("DeleteWorkers", "FAILED", 0)]}}},
            "deletionRules[0] uses DeleteWorkers, which KubeRay refuses while",
        ),
        (
            {
                "job": {
                    "deletionStrategy": {
                        "deletionRules": [
                            _rule("DeleteSelf", "SUCCEEDED", 60),
                            _rule("DeleteCluster", "SUCCEEDED", 3600),
                        ]
                    }
                }
            },
            "requires DeleteWorkers <= DeleteCluster <= DeleteSelf",
        ),
        (
            {
                "job": {
                    "deletionStrategy": {"deletionRules": [_rule("DeleteCluster", "FAILED", 1)] * 2}
                }
            },
            "has two DeleteCluster rules for jobStatus FAILED",
        ),
        (
            {
                "job": {
                    "deletionStrategy": {
                        "deletionRules": [
                            {
                                "policy": "DeleteCluster",
                                "condition": {
                                    "jobStatus": "FAILED",
                                    "jobDeploymentStatus": "Failed",
                                },
                            }
                        ]
                    }
                }
            },
            "/job/deletionStrategy/deletionRules/0/condition",
        ),
        # Security: no MLflow outside the cluster without a login.
        (
            {"mlflow": {"auth": {"enabled": False}, "service": {"type": "LoadBalancer"}}},
            "mlflow.service.type=LoadBalancer exposes MLflow outside the cluster",
        ),
        # Resuming needs the run's own config and a run directory that outlived the cluster.
        ({"job": {"resume": True, "overrides": ["a.b=1"]}}, "job.resume=true continues the run"),
        ({"job": {"resume": True, "command": "sweep"}}, "set job.command=run"),
        (
            {"job": {"resume": True}, "sharedVolume": {"enabled": False}},
            "keep sharedVolume.enabled",
        ),
    ],
)
def test_bad_values_fail_with_a_message_naming_the_value(
    values: dict[str, Any], expected: str
) -> None:
    with pytest.raises(helm_python.HelmError) as err:
        render(values)
    assert expected in str(err.value)


@pytest.mark.parametrize(
    ("release", "job_enabled", "expected"),
    [
        ("2024-run", True, 'the resource name "2024-run-n2n" (from the release name) must start'),
        ("exp.v2", True, "must start with a lowercase letter"),
        ("r" * 44, True, "has 48 characters and KubeRay refuses more than 47"),
        ("r" * 50, False, "has 54 characters and KubeRay refuses more than 53"),
    ],
)
def test_release_names_kuberay_refuses_fail_at_install(
    release: str, job_enabled: bool, expected: str
) -> None:
    assert helm_python.validate_release_name(release) is None  # Helm itself takes them
    with pytest.raises(helm_python.HelmError) as err:
        render({"job": {"enabled": job_enabled}}, name=release)
    assert expected in str(err.value)


def test_longest_names_kuberay_takes_render(crd_validators: dict[str, Any]) -> None:
    # A RayJob of 47 characters and a RayCluster of 53: exactly KubeRay's limits.
    validate_all(objects(render(name="r" * 43)), crd_validators)
    validate_all(objects(render({"job": {"enabled": False}}, name="r" * 49)), crd_validators)


@pytest.mark.parametrize(
    "case", ["ttl-without-shutdown", "name-too-long", "name-starts-with-digit"]
)
def test_operator_rules_refuse_what_the_crd_schema_takes(
    case: str, crd_validators: dict[str, Any]
) -> None:
    """The three RayJobs that lint and the CRD schema pass but KubeRay v1.7 refuses."""
    rayjob = copy.deepcopy(one(objects(render()), "RayJob"))
    assert refusal(rayjob) is None
    if case == "ttl-without-shutdown":
        rayjob["spec"]["ttlSecondsAfterFinished"] = 3600
        expected = "shutdownAfterJobFinishes set to false cannot have TTLSecondsAfterFinished"
    elif case == "name-too-long":
        rayjob["metadata"]["name"] = "n" * 48
        expected = "RayJob name should be no more than 47 characters"
    else:
        rayjob["metadata"]["name"] = "1-n2n"
        expected = "RayJob name should be a valid DNS1035 label"
    if crd_validators:
        assert crd_validators["RayJob"].is_valid(rayjob)
    assert expected in (refusal(rayjob) or "")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda job: job["spec"]["rayClusterSpec"].update(rayVersion="2.51.0"),
            "authOptions.mode is 'token' but minimum Ray version is 2.52.0",
        ),
        (
            lambda job: job["spec"]["rayClusterSpec"]["headGroupSpec"].update(
                resources={"cpu": "2"}
            ),
            "resource fields should not be set in both rayStartParams and Resources for Head",
        ),
        (
            lambda job: (
                job["spec"]["rayClusterSpec"].update(enableInTreeAutoscaling=False),
                job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("maxReplicas"),
            ),
            "must set both minReplicas and maxReplicas when autoscaling is disabled",
        ),
        (
            lambda job: job["spec"].update(activeDeadlineSeconds=0),
            "activeDeadlineSeconds must be a positive integer",
        ),
        (
            lambda job: job["spec"]["deletionStrategy"]["deletionRules"].append(
                _rule("DeleteSelf", "SUCCEEDED", 60)
            ),
            "for JobStatus 'SUCCEEDED': DeleteSelf TTL (60) must be >= DeleteCluster TTL (3600)",
        ),
    ],
)
def test_kuberay_rules_refuse_as_the_operator_does(change: Any, expected: str) -> None:
    """A few of KubeRay's own refusals, on the default RayJob, so the port stays honest."""
    rayjob = copy.deepcopy(one(objects(render()), "RayJob"))
    change(rayjob)
    assert expected in (refusal(rayjob) or "")


def test_deletion_rules_need_the_feature_gate_of_kuberay_v1_6() -> None:
    rayjob = one(objects(render()), "RayJob")
    v1_5_defaults = {"RayJobDeletionPolicy": False}
    assert "RayJobDeletionPolicy feature gate must be enabled" in (
        refusal(rayjob, v1_5_defaults) or ""
    )
    # The TTL form works on any KubeRay: shutdownAfterJobFinishes with no deletion strategy.
    legacy = one(
        objects(
            render(
                {
                    "job": {
                        "shutdownAfterJobFinishes": True,
                        "ttlSecondsAfterFinished": 600,
                        "deletionStrategy": None,
                    }
                }
            )
        ),
        "RayJob",
    )
    assert "deletionStrategy" not in legacy["spec"]
    assert legacy["spec"]["ttlSecondsAfterFinished"] == 600
    assert refusal(legacy) is None and refusal(legacy, v1_5_defaults) is None


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
    # The only Secret the chart makes is MLflow's generated login: no S3 key, no backend URI.
    assert [o["metadata"]["name"] for o in by_kind(objs)["Secret"]] == ["n2n-mlflow-auth"]
    assert FAKE_SECRET not in yaml.safe_dump_all(objs)


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


def _pod_env(container: dict[str, Any], secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """A container's environment as the kubelet builds it: values, and keys of Secrets."""
    env = {}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def _secrets(objs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    return {
        o["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in o["data"].items()}
        for o in objs
        if o["kind"] == "Secret"
    }


@pytest.mark.timeout(240)
def test_rendered_mlflow_server_asks_for_a_login_and_enforces_allowed_hosts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starts `mlflow server` as the chart's Deployment does: its arguments, its environment
    (the login from the rendered Secret, as the kubelet would inject it) and its basic-auth
    settings from the rendered ConfigMap. Paths of the volumes and the port move to loopback;
    the Kubernetes side (Secret injection, read-only root) is what is simulated."""
    pytest.importorskip(
        "flask_wtf", reason="MLflow's basic-auth app needs Flask-WTF: pip install 'mlflow[auth]'"
    )
    import mlflow

    objs = objects(render())
    secrets = _secrets(objs)
    deployment = one(objs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    data, tmp, auth_dir, cwd = (tmp_path / d for d in ("data", "tmp", "auth", "cwd"))
    for folder in (data, tmp, auth_dir, cwd):
        folder.mkdir()
    moved = {
        mounts["data"]: str(data),
        mounts["tmp"]: str(tmp),
        mounts["auth-config"]: str(auth_dir),
    }

    mount_path = re.compile("|".join(re.escape(m) for m in sorted(moved, key=len, reverse=True)))

    def local(text: str) -> str:  # one pass, so a moved path is never moved again
        return mount_path.sub(lambda match: moved[match.group(0)], text)

    auth_config = next(
        o for o in objs if o["kind"] == "ConfigMap" and "basic_auth.ini" in o["data"]
    )
    (auth_dir / "basic_auth.ini").write_text(local(auth_config["data"]["basic_auth.ini"]))
    port = free_port()
    args = [local(arg) for arg in container["args"]]
    assert args[:2] == ["--app-name", "basic-auth"]
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--port") + 1] = str(port)
    env = {**os.environ, **{k: local(v) for k, v in _pod_env(container, secrets).items()}}
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(var, None)
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    login = (env["MLFLOW_AUTH_ADMIN_USERNAME"], env["MLFLOW_AUTH_ADMIN_PASSWORD"])
    assert login[0] == "admin" and len(login[1]) >= 32
    command = [sys.executable, "-m", *container["command"], *args]
    assert command[2:4] == ["mlflow", "server"]
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                # The probe path answers whatever the Host header (kubelet uses the pod IP) and
                # without a login.
                health = requests.get(f"{url}/health", headers={"Host": "10.1.2.3:5000"}, timeout=2)
                if health.status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer /health"
            time.sleep(0.25)
        api = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        for host, auth, status in [
            ("n2n-mlflow:5000", None, 401),  # no login, no data
            ("n2n-mlflow:5000", (login[0], "wrong"), 401),
            ("n2n-mlflow:5000", login, 200),
            (f"n2n-mlflow.{NAMESPACE}.svc.cluster.local:5000", login, 200),
            ("localhost:5000", login, 200),
            ("evil.example.com:5000", login, 403),
        ]:
            answer = requests.get(api, headers={"Host": host}, auth=auth, timeout=10)
            assert answer.status_code == status, (host, answer.status_code, answer.text[:200])

        # The Ray side logs in with the same Secret (its MLFLOW_TRACKING_* variables) and its
        # artifacts go through the server onto the server's volume.
        ray_env = _pod_env(containers(objs)["ray-worker"], secrets)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ray_env["MLFLOW_TRACKING_USERNAME"])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ray_env["MLFLOW_TRACKING_PASSWORD"])
        client = mlflow.MlflowClient(tracking_uri=url)
        run = client.create_run(client.create_experiment("chart-login"))
        (tmp_path / "note.txt").write_text("kept by the server")
        client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
        assert list((data / "artifacts").rglob("note.txt")), "artifact not on the server volume"
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        with pytest.raises(mlflow.exceptions.MlflowException, match="401|credentials|Unauthorized"):
            mlflow.MlflowClient(tracking_uri=url).search_experiments()

        # Stores on the volume; nothing written where the read-only root filesystem would be.
        assert (data / "mlflow.db").is_file() and (data / "basic_auth.db").is_file()
        assert list(cwd.iterdir()) == []
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
        "ConfigMap",
        "Deployment",
        "NetworkPolicy",
        "NetworkPolicy",
        "PersistentVolumeClaim",
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
    assert cfg.output.run_dir == "/mnt/n2n/runs/n2n"

    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is False and spec["backoffLimit"] == 0
    assert spec["deletionStrategy"]["deletionRules"] and spec["activeDeadlineSeconds"] > 0
    results = next(
        o
        for o in objs
        if o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == "n2n-results"
    )
    assert results["spec"]["accessModes"] == ["ReadWriteMany"]
    for obj in (rayjob, one(objs, "RayCluster")):
        cluster = cluster_spec(obj)
        assert cluster["enableInTreeAutoscaling"] is True
        assert cluster["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0"}
        head = cluster["headGroupSpec"]["template"]["spec"]
        assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]
        gpu, cpu = cluster["workerGroupSpecs"]
        assert gpu["minReplicas"] < gpu["maxReplicas"]
        pod = gpu["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
            "tolerations"
        ]
        assert (
            "nvidia.com/gpu" not in cpu["template"]["spec"]["containers"][0]["resources"]["limits"]
        )
        for pod_spec in (head, pod, cpu["template"]["spec"]):
            claims = [
                v["persistentVolumeClaim"]["claimName"]
                for v in pod_spec["volumes"]
                if "persistentVolumeClaim" in v
            ]
            assert claims == ["n2n-results"]
    for name, container in containers(objs).items():
        assert container["resources"]["requests"] and container["resources"]["limits"], name

    deployment = one(objs, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def _plain_equivalent_values() -> dict[str, Any]:
    """The chart values whose rendering the plain manifests write out by hand."""
    plain_gpu = one(plain_objects(), "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    resources = copy.deepcopy(plain_gpu["template"]["spec"]["containers"][0]["resources"])
    resources["limits"].pop("nvidia.com/gpu")
    return {
        "fullnameOverride": "n2n",
        "ray": {
            "workers": {"groupName": "gpu-workers", "gpus": 1, "resources": resources},
            "gpusPerChild": 0.25,
        },
        "mlflow": {"auth": {"existingSecret": "n2n-mlflow-auth"}},
    }


def _pod_shape(pod: dict[str, Any]) -> dict[str, Any]:
    """What must agree between a chart pod and its plain twin (labels and comments may not)."""
    container = pod["spec"]["containers"][0]
    return {
        "automountServiceAccountToken": pod["spec"].get("automountServiceAccountToken"),
        "securityContext": pod["spec"]["securityContext"],
        "tolerations": pod["spec"].get("tolerations"),
        "volumes": pod["spec"].get("volumes"),
        "container": {
            key: container.get(key)
            for key in ("env", "resources", "securityContext", "volumeMounts", "ports")
        },
    }


@pytest.mark.parametrize("kind", ["RayJob", "RayCluster"])
def test_plain_manifests_match_the_chart_where_they_should(kind: str) -> None:
    """The plain manifests are the chart's GPU rendering written out by hand: keep them in step."""
    values = _plain_equivalent_values()
    if kind == "RayCluster":
        values |= {"job": {"enabled": False}}
        values["ray"]["auth"] = {"existingSecret": "n2n-ray-token"}
    chart_objs, plain_objs = objects(render(values)), plain_objects()
    chart, plain = one(chart_objs, kind), one(plain_objs, kind)
    if kind == "RayJob":
        assert chart["spec"]["entrypoint"] == plain["spec"]["entrypoint"]
        for key in (
            "shutdownAfterJobFinishes",
            "deletionStrategy",
            "activeDeadlineSeconds",
            "backoffLimit",
        ):
            assert chart["spec"].get(key) == plain["spec"].get(key), key
        assert "ttlSecondsAfterFinished" not in plain["spec"]
        assert _pod_shape(chart["spec"]["submitterPodTemplate"]) == _pod_shape(
            plain["spec"]["submitterPodTemplate"]
        )
    chart_cluster, plain_cluster = cluster_spec(chart), cluster_spec(plain)
    for key in ("rayVersion", "authOptions", "enableInTreeAutoscaling", "autoscalerOptions"):
        assert chart_cluster[key] == plain_cluster[key], key
    assert (
        chart_cluster["headGroupSpec"]["rayStartParams"]
        == plain_cluster["headGroupSpec"]["rayStartParams"]
    )
    assert _pod_shape(chart_cluster["headGroupSpec"]["template"]) == _pod_shape(
        plain_cluster["headGroupSpec"]["template"]
    )
    chart_groups = chart_cluster["workerGroupSpecs"]
    plain_groups = plain_cluster["workerGroupSpecs"]
    assert [g["groupName"] for g in chart_groups] == [g["groupName"] for g in plain_groups]
    for chart_group, plain_group in zip(chart_groups, plain_groups, strict=True):
        for key in ("replicas", "minReplicas", "maxReplicas", "rayStartParams"):
            assert chart_group[key] == plain_group[key], (chart_group["groupName"], key)
        assert _pod_shape(chart_group["template"]) == _pod_shape(plain_group["template"])

    # The objects around the Ray cluster: volumes, network policies, MLflow's login settings.
    def named(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
        return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)

    for kind_, name in [
        ("NetworkPolicy", "n2n-ray"),
        ("NetworkPolicy", "n2n-mlflow"),
        ("PersistentVolumeClaim", "n2n-results"),
        ("ConfigMap", "n2n-mlflow-auth-config"),
    ]:
        chart_obj, plain_obj = named(chart_objs, kind_, name), named(plain_objs, kind_, name)
        assert chart_obj.get("spec", chart_obj.get("data")) == plain_obj.get(
            "spec", plain_obj.get("data")
        ), name
    chart_mlflow = one(chart_objs, "Deployment")["spec"]["template"]
    plain_mlflow = one(plain_objs, "Deployment")["spec"]["template"]
    assert _pod_shape(chart_mlflow) == _pod_shape(plain_mlflow)
    chart_args = chart_mlflow["spec"]["containers"][0]["args"]
    plain_args = plain_mlflow["spec"]["containers"][0]["args"]
    # Allowed hosts differ on purpose: the plain list takes any namespace.
    cut = chart_args.index("--allowed-hosts")
    assert chart_args[:cut] == plain_args[:cut]
