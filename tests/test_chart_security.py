"""The chart's security defaults: what reaches what, who logs in, what may write, what checkov says.

Rendered with Helm's real engine (see tests/test_k8s.py). Two things are faked because no
cluster can run here, and kept small: NetworkPolicy peer matching (a label-selector matcher of a
few lines applied to the rendered pod templates, as the network plugin would apply it to pods)
and the Dockerfile build (read as text: no container engine here, so the test checks the stages
and pins it can see). checkov is real; it lives in its own virtual environment because its pins
(packaging<24, networkx<2.7) conflict with the project's: point CHECKOV at its executable, or
create .venv-checkov (`python -m venv .venv-checkov && .venv-checkov/bin/pip install
checkov==3.3.30`).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_k8s import (
    CHART,
    NAMESPACE,
    ROOT,
    by_kind,
    cluster_spec,
    containers,
    gpu_values,
    objects,
    one,
    render,
)

SKIPS_FILE = ROOT / "helm" / "checkov-skips.yaml"
DOCKERFILE = ROOT / "k8s" / "Dockerfile"


def pod_templates(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod template of a rendering, by a short name: head, each worker group, submitter,
    mlflow."""
    pods = {}
    for obj in objs:
        if obj["kind"] in ("RayJob", "RayCluster"):
            spec = cluster_spec(obj)
            pods["head"] = spec["headGroupSpec"]["template"]
            for group in spec["workerGroupSpecs"]:
                pods[group["groupName"]] = group["template"]
            if "submitterPodTemplate" in obj["spec"]:
                pods["submitter"] = obj["spec"]["submitterPodTemplate"]
        elif obj["kind"] == "Deployment":
            pods["mlflow"] = obj["spec"]["template"]
    return pods


# --------------------------------------------------------------------------- pods


@pytest.mark.parametrize("values_name", ["defaults", "gpu", "no-autoscaling"])
def test_only_the_autoscaling_head_gets_a_service_account_token(values_name: str) -> None:
    values = {
        "defaults": {},
        "gpu": gpu_values(),
        "no-autoscaling": {"ray": {"autoscaling": {"enabled": False}}},
    }[values_name]
    pods = pod_templates(objects(render(values)))
    assert set(pods) == {"head", "workers", "cpu-workers", "submitter", "mlflow"}
    for name, pod in pods.items():
        # KubeRay's autoscaler sidecar on the head patches the RayCluster through the API.
        wanted = name == "head" and values_name != "no-autoscaling"
        assert pod["spec"]["automountServiceAccountToken"] is wanted, name


def test_every_pod_runs_as_non_root_without_privileges() -> None:
    for name, pod in pod_templates(objects(render(gpu_values()))).items():
        context = pod["spec"]["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] >= 1000, name
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in pod["spec"]["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            assert "privileged" not in security and "hostPath" not in json.dumps(pod), name


def test_mlflow_root_is_read_only_and_ray_gets_a_writable_tmp_ray() -> None:
    pods = pod_templates(objects(render()))
    mlflow = pods["mlflow"]["spec"]
    container = mlflow["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in mlflow["volumes"]}
    writable = {
        m["mountPath"]: m["name"] for m in container["volumeMounts"] if not m.get("readOnly")
    }
    assert writable == {"/data": "data", "/tmp": "tmp"}
    assert volumes["tmp"] == {"name": "tmp", "emptyDir": {}}
    assert {e["name"]: e.get("value") for e in container["env"]}["HOME"] == "/tmp"

    for name in ("head", "workers", "cpu-workers"):
        spec = pods[name]["spec"]
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
        # Named like KubeRay's own /tmp/ray volume, so the autoscaler sidecar shares this one.
        assert mounts["/tmp/ray"] == "ray-logs", name
        assert {"name": "ray-logs", "emptyDir": {}} in spec["volumes"], name

    # Opting out is possible and explicit.
    relaxed = one(objects(render({"mlflow": {"readOnlyRootFilesystem": False}})), "Deployment")
    assert (
        relaxed["spec"]["template"]["spec"]["containers"][0]["securityContext"][
            "readOnlyRootFilesystem"
        ]
        is False
    )


# --------------------------------------------------------------------------- MLflow login


def test_mlflow_login_is_on_by_default_from_a_generated_secret() -> None:
    first, second = objects(render()), objects(render())
    secret = one(first, "Secret")
    assert secret["metadata"]["name"] == "n2n-mlflow-auth"
    # Kept on uninstall: MLflow's volume (also kept) holds the admin user made from it.
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert set(data) == {"admin-username", "admin-password", "flask-secret-key"}
    assert data["admin-username"] == "admin"
    assert len(data["admin-password"]) >= 32 and data["admin-password"].isalnum()
    # Random per install (an upgrade keeps the live Secret's values through `lookup`).
    assert one(second, "Secret")["data"]["admin-password"] != secret["data"]["admin-password"]

    mlflow = containers(first)["mlflow"]
    assert mlflow["args"][:2] == ["--app-name", "basic-auth"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in mlflow["env"] if "valueFrom" in e}
    assert refs == {
        "MLFLOW_AUTH_ADMIN_USERNAME": {"name": "n2n-mlflow-auth", "key": "admin-username"},
        "MLFLOW_AUTH_ADMIN_PASSWORD": {"name": "n2n-mlflow-auth", "key": "admin-password"},
        "MLFLOW_FLASK_SERVER_SECRET_KEY": {"name": "n2n-mlflow-auth", "key": "flask-secret-key"},
    }
    for name in ("ray-head", "ray-worker"):
        env = {e["name"]: e for e in containers(first)[name]["env"]}
        assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "n2n-mlflow-auth",
            "key": "admin-password",
        }
    # The password is never a plain value anywhere but the Secret.
    plain = yaml.safe_dump_all([o for o in first if o["kind"] != "Secret"])
    assert data["admin-password"] not in plain and secret["data"]["admin-password"] not in plain

    notes = render()["n2n/templates/NOTES.txt"]
    assert (
        f"kubectl -n {NAMESPACE} get secret n2n-mlflow-auth -o jsonpath='{{.data.admin-password}}'"
        in notes
    )


def test_an_existing_secret_replaces_the_generated_one() -> None:
    objs = objects(render({"mlflow": {"auth": {"existingSecret": "team-mlflow-login"}}}))
    assert "Secret" not in by_kind(objs)
    refs = [
        e["valueFrom"]["secretKeyRef"]["name"]
        for c in containers(objs).values()
        for e in c.get("env", [])
        if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]
    ]
    assert refs and set(refs) == {"team-mlflow-login"}


def test_auth_off_is_possible_inside_the_cluster_only() -> None:
    objs = objects(render({"mlflow": {"auth": {"enabled": False}}}))
    assert "Secret" not in by_kind(objs)
    assert "--app-name" not in containers(objs)["mlflow"]["args"]
    assert "MLFLOW_TRACKING_PASSWORD" not in {
        e["name"] for e in containers(objs)["ray-head"]["env"]
    }
    # Exposing it then fails (tests/test_k8s.py checks the message); with the login it renders.
    for service_type in ("NodePort", "LoadBalancer"):
        exposed = objects(render({"mlflow": {"service": {"type": service_type}}}))
        assert one(exposed, "Service")["spec"]["type"] == service_type


# --------------------------------------------------------------------------- NetworkPolicy


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels, matchExpressions In/NotIn/Exists)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value, op = labels.get(expr["key"]), expr["operator"]
        if (
            (op == "In" and value not in expr["values"])
            or (op == "NotIn" and value in expr["values"])
            or (op == "Exists" and value is None)
            or (op == "DoesNotExist" and value is not None)
        ):
            return False
    return True


def allowed(policy: dict[str, Any], source: dict[str, str], port: int) -> bool:
    """Whether a pod with ``source`` labels in the same namespace may reach ``port``."""
    for rule in policy["spec"]["ingress"]:
        ports = [p["port"] for p in rule.get("ports", [])]
        if ports and port not in ports:
            continue
        peers = rule.get("from")
        if not peers:  # no `from`: every source
            return True
        for peer in peers:
            if "ipBlock" in peer or "namespaceSelector" in peer:
                continue  # other namespaces / addresses: not a same-namespace pod peer
            if selects(peer["podSelector"], source):
                return True
    return False


def test_only_the_release_pods_reach_mlflow_and_ray() -> None:
    objs = objects(render())
    policies = {p["metadata"]["name"]: p for p in by_kind(objs)["NetworkPolicy"]}
    assert set(policies) == {"n2n-mlflow", "n2n-ray"}
    pods = pod_templates(objs)
    labels = {name: pod["metadata"]["labels"] for name, pod in pods.items()}
    stranger = {"app.kubernetes.io/name": "n2n", "app.kubernetes.io/instance": "other-release"}
    mlflow, ray = policies["n2n-mlflow"], policies["n2n-ray"]
    assert mlflow["spec"]["policyTypes"] == ["Ingress"] == ray["spec"]["policyTypes"]

    # Which pods each policy isolates.
    assert [n for n in pods if selects(mlflow["spec"]["podSelector"], labels[n])] == ["mlflow"]
    ray_pods = [n for n in pods if selects(ray["spec"]["podSelector"], labels[n])]
    assert sorted(ray_pods) == ["cpu-workers", "head", "workers"]

    # Who reaches them: the Ray pods (the job logs to MLflow), the submitter (to the dashboard),
    # each other on any port; nobody from another release.
    for name in ("head", "workers", "cpu-workers"):
        assert allowed(mlflow, labels[name], 5000), name
        assert allowed(ray, labels[name], 6379) and allowed(ray, labels[name], 12345), name
    assert allowed(ray, labels["submitter"], 8265)
    assert not allowed(mlflow, stranger, 5000)
    assert not allowed(ray, stranger, 8265) and not allowed(ray, stranger, 6379)
    assert not allowed(mlflow, labels["head"], 22)  # only MLflow's port

    # The KubeRay operator, from its own namespace, reaches the dashboard port and nothing else.
    operator_rules = [
        r for r in ray["spec"]["ingress"] if any("namespaceSelector" in p for p in r["from"])
    ]
    assert [p["port"] for r in operator_rules for p in r["ports"]] == [8265]
    assert operator_rules[0]["from"][0]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "kuberay-operator"
    }


def test_an_exposed_mlflow_opens_its_port_and_extra_peers_are_added() -> None:
    ingress_controller = {"namespaceSelector": {"matchLabels": {"name": "ingress-nginx"}}}
    objs = objects(
        render(
            {
                "mlflow": {"service": {"type": "LoadBalancer"}},
                "networkPolicy": {"mlflowFrom": [ingress_controller]},
            }
        )
    )
    mlflow = next(
        p for p in by_kind(objs)["NetworkPolicy"] if p["metadata"]["name"] == "n2n-mlflow"
    )
    stranger = {"app": "anything"}
    assert allowed(mlflow, stranger, 5000) and not allowed(mlflow, stranger, 22)
    assert ingress_controller in mlflow["spec"]["ingress"][0]["from"]
    assert not allowed(_policy(render(), "n2n-mlflow"), stranger, 5000)  # ClusterIP: closed
    assert "NetworkPolicy" not in by_kind(objects(render({"networkPolicy": {"enabled": False}})))


def _policy(rendered: dict[str, str], name: str) -> dict[str, Any]:
    return next(
        o
        for o in objects(rendered)
        if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == name
    )


# --------------------------------------------------------------------------- checkov


def checkov_executable() -> str | None:
    for candidate in (
        os.environ.get("CHECKOV"),
        str(ROOT / ".venv-checkov" / "bin" / "checkov"),
        shutil.which("checkov"),
    ):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def checkov_skips() -> dict[str, str]:
    return yaml.safe_load(SKIPS_FILE.read_text())


def write_for_checkov(objs: list[dict[str, Any]], folder: Path) -> None:
    """Writes a rendering as checkov reads it: every object, plus every pod template of the
    RayJob/RayCluster as a plain Pod (checkov does not look inside custom resources)."""
    folder.mkdir(parents=True)
    for i, obj in enumerate(objs):
        obj = dict(obj, metadata={**obj["metadata"], "namespace": NAMESPACE})  # as `helm -n` does
        (folder / f"{i:02d}-{obj['kind']}.yaml").write_text(yaml.safe_dump(obj))
        if obj["kind"] not in ("RayJob", "RayCluster"):
            continue
        for name, template in pod_templates([obj]).items():
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    **template.get("metadata", {}),
                    "name": f"{obj['metadata']['name']}-{name}",
                    "namespace": NAMESPACE,
                },
                "spec": template["spec"],
            }
            (folder / f"{i:02d}-Pod-{name}.yaml").write_text(yaml.safe_dump(pod))


def run_checkov(folder: Path, *flags: str) -> list[dict[str, Any]]:
    """The failed checks of `checkov -d folder` (offline: --skip-download)."""
    executable = checkov_executable()
    command = [executable, "-d", str(folder), "--framework", "kubernetes", "--compact"]
    command += ["-o", "json", "--skip-download", *flags]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode in (0, 1), done.stderr[-3000:]  # 1: some check failed
    report = json.loads(done.stdout)
    reports = report if isinstance(report, list) else [report]
    assert all(r["check_type"] == "kubernetes" for r in reports)
    assert sum(r["summary"]["parsing_errors"] for r in reports) == 0
    assert sum(r["summary"]["resource_count"] for r in reports) > 0
    return [check for r in reports for check in r["results"]["failed_checks"]]


RENDERINGS = {
    "defaults": {},
    "gpu": None,  # ci/gpu-values.yaml
    "raycluster": {"job": {"enabled": False}},
    "exposed": {"mlflow": {"service": {"type": "LoadBalancer"}}},
}


@pytest.fixture(scope="module")
def checkov_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if checkov_executable() is None:
        pytest.skip(
            "checkov not found: set CHECKOV to its executable or run `python -m venv "
            ".venv-checkov && .venv-checkov/bin/pip install checkov==3.3.30` (its pins conflict "
            "with the project's, so it has its own virtual environment)"
        )
    folder = tmp_path_factory.mktemp("checkov")
    for name, values in RENDERINGS.items():
        write_for_checkov(
            objects(render(gpu_values() if values is None else values)), folder / name
        )
    return folder


def test_checkov_skips_are_few_and_justified() -> None:
    skips = checkov_skips()
    assert 0 < len(skips) <= 10
    for check, reason in skips.items():
        assert re.fullmatch(r"CKV_K8S_\d+", check), check
        assert isinstance(reason, str) and len(reason) > 20 and "\n" not in reason, check


@pytest.mark.timeout(600)
def test_checkov_finds_nothing_in_the_rendered_chart(checkov_dir: Path) -> None:
    skips = checkov_skips()
    failed = run_checkov(checkov_dir, "--skip-check", ",".join(skips))
    assert failed == [], [
        f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']})" for c in failed
    ]
    # Every skip still fires somewhere, so none outlives its reason.
    fired = {c["check_id"] for c in run_checkov(checkov_dir, "--check", ",".join(skips))}
    assert fired == set(skips), f"skips that no longer fire: {set(skips) - fired}"


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_stages() -> dict[str, str]:
    """The Dockerfile's build stages by name, in order, each with its instructions as text."""
    stages: dict[str, str] = {}
    current = None
    for line in DOCKERFILE.read_text().splitlines():
        match = re.match(r"^FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            current = match.group(1) or f"stage{len(stages)}"
            stages[current] = ""
        elif current and not line.lstrip().startswith("#"):
            stages[current] += line + "\n"
    return stages


def pyproject_pin(package: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        match = re.fullmatch(rf"{re.escape(package)}(\[[^\]]*\])?==(\S+)", dep)
        if match:
            return match.group(2)
    raise AssertionError(f"{package} is not pinned in pyproject.toml")


def test_dockerfile_has_a_slim_mlflow_target_with_the_clients_pins() -> None:
    stages = dockerfile_stages()
    # The n2n image stays the default target (the last stage); `--target mlflow` builds the slim one.
    assert list(stages) == ["mlflow", "n2n"]
    mlflow_pin = pyproject_pin("mlflow")
    for name, text in stages.items():
        installs = " ".join(re.findall(r"pip install[^\n]*", text))
        # Server and client versions match; the basic-auth app and the PostgreSQL driver are in.
        assert f'"mlflow[auth]=={mlflow_pin}"' in installs, name
        assert re.search(r"psycopg2-binary==\d+\.\d+\.\d+", installs), name
        assert re.search(r"boto3==\d+\.\d+\.\d+", installs), name
        users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
        assert users and users[-1] in ("ray", "1000:100"), f"{name} ends as {users}"
    # One pin of each driver across both images.
    for package in ("psycopg2-binary", "boto3"):
        assert len(set(re.findall(rf"{package}==(\S+)", DOCKERFILE.read_text()))) == 1, package
    assert "python:3.11-slim" in DOCKERFILE.read_text()
    # The chart's pod security context is the images' user.
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == 1000
    assert values["podSecurityContext"]["runAsGroup"] == 100
    assert "useradd --uid 1000 --gid 100" in stages["mlflow"]
