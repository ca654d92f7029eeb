"""``n2n submit --k8s``: the run as a KubeRay RayJob, created and followed through the
Kubernetes API (the ``kubernetes`` client, with the kubeconfig or the in-cluster config).

:func:`plan_job` checks everything that can be checked here (config, name, storage, tracking)
and :func:`manifests` builds two objects from the plan:

- a ConfigMap ``<name>-config`` with the validated config as ``config.yaml``, mounted on the
  head at ``/etc/n2n`` (owned by the RayJob once created, so deleting the RayJob removes it);
- a RayJob (``ray.io/v1``): a head with ``num-cpus: "0"`` that only runs the driver, one worker
  group (``--workers`` pods with ``--gpus`` GPUs each, the ``nvidia.com/gpu`` toleration when
  there are GPUs; children share them through ``ray.gpus_per_child``), token authentication,
  ``shutdownAfterJobFinishes`` with ``ttlSecondsAfterFinished`` (or neither with
  ``--keep-cluster``: KubeRay refuses a TTL without the shutdown), ``activeDeadlineSeconds``.

Results outlive the job: with ``--pvc`` the claim is mounted on every pod at ``--pvc-mount``
and the run directory (and Tune storage inside it) is ``<mount>/runs/<name>``, a relative SQLite
store goes to ``<mount>/``; without it the run directory is the head pod's and only an MLflow
server (``--tracking-uri http://...``) keeps the results, so a SQLite store is refused.

:func:`follow` polls ``status.jobDeploymentStatus``/``status.jobStatus``, streams the submitter
pod's log (KubeRay's submitter Job, named like the RayJob, runs ``ray job submit`` and then
``ray job logs --follow``) and maps the end to ``n2n submit``'s exit codes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import re
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import PurePosixPath
from typing import Any

import yaml

from pipeline.cluster.job_paths import sqlite_path
from pipeline.cluster.submit import (
    EXIT_DEADLINE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_STOPPED,
    EXIT_SUCCEEDED,
    SubmitError,
    job_name,
    note,
)
from pipeline.config.schema import DEFAULT_PRESET, RunConfig, load_config, validate_config
from pipeline.tracking.redaction import redact, scrub_url

GROUP, VERSION, PLURAL, KIND = "ray.io", "v1", "rayjobs", "RayJob"
RAY_VERSION = "2.60.0"
MAX_NAME = 47
"""KubeRay's limit on a RayJob name (its RayCluster and Services append suffixes)."""
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
CONFIG_DIR = "/etc/n2n"
SUBMITTER_CONTAINER = "ray-job-submitter"
DEFAULT_DEADLINE_S = 48 * 3600
TERMINAL_JOB = ("SUCCEEDED", "FAILED", "STOPPED")
TERMINAL_DEPLOYMENT = ("Complete", "Failed")
LOG_DRAIN_S = 15.0
"""How long the end of the submitter's log may take to arrive after the job ends."""


@dataclass
class JobPlan:
    """Everything the manifests are built from, checked."""

    name: str
    namespace: str | None
    image: str
    entrypoint: list[str]
    config_yaml: str | None
    """The validated config, or None when resuming (the run directory holds it)."""
    gpus: int = 0
    workers: int = 1
    worker_cpus: str = "4"
    worker_memory: str = "16Gi"
    head_cpus: str = "2"
    head_memory: str = "8Gi"
    pvc: str | None = None
    pvc_mount: str = "/data"
    env_secrets: list[str] = field(default_factory=list)
    ttl_s: int | None = 600
    """``ttlSecondsAfterFinished``; None keeps the cluster (no ``shutdownAfterJobFinishes``)."""
    deadline_s: int = DEFAULT_DEADLINE_S


# --------------------------------------------------------------------------- checks


def check_name(name: str) -> None:
    """Refuses a name the KubeRay operator would refuse (DNS-1035 label, at most 47 chars)."""
    if len(name) > MAX_NAME or not DNS_1035.fullmatch(name):
        raise SubmitError(
            f"RayJob name {name!r} is not usable: KubeRay wants a DNS-1035 label of at most "
            f"{MAX_NAME} characters (lower-case letters, digits and '-', starting with a letter); "
            "pass another --name"
        )


def _under(path: str, mount: str) -> bool:
    return PurePosixPath(path).is_relative_to(PurePosixPath(mount))


def plan_job(args: argparse.Namespace) -> JobPlan:
    """Validates an ``n2n submit --k8s`` command line into a :class:`JobPlan` (no API calls)."""
    if args.address:
        raise SubmitError("--address names Ray's job server; drop it with --k8s")
    mount = args.pvc_mount.rstrip("/") or "/"
    if not PurePosixPath(mount).is_absolute():
        raise SubmitError(f"--pvc-mount {args.pvc_mount} must be an absolute path, e.g. /data")
    for flag, value, least in (("--gpus", args.gpus, 0), ("--workers", args.workers, 1),
                               ("--ttl", args.ttl, 0), ("--deadline", args.deadline, 1)):  # fmt: skip
        if value is not None and value < least:
            raise SubmitError(f"{flag} {value} must be at least {least}")
    if args.resume:
        name = args.name or f"n2n-resume-{time.strftime('%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        entrypoint, config_yaml = _resume_entrypoint(args, mount), None
    else:
        from pipeline.cli.main import flag_overrides

        cfg = load_config(args.preset or DEFAULT_PRESET, [*args.overrides, *flag_overrides(args)])
        name = args.name or job_name(cfg)
        check_name(name)
        cfg = _job_config(args, cfg, name, mount)
        config_yaml = cfg.to_yaml()
        entrypoint = _run_entrypoint(args, cfg)
    check_name(name)
    return JobPlan(
        name=name,
        namespace=args.namespace,
        image=args.image or _default_image(),
        entrypoint=entrypoint,
        config_yaml=config_yaml,
        gpus=args.gpus,
        workers=args.workers,
        worker_cpus=str(args.worker_cpus),
        worker_memory=str(args.worker_memory),
        head_cpus=str(args.head_cpus),
        head_memory=str(args.head_memory),
        pvc=args.pvc,
        pvc_mount=mount,
        env_secrets=list(args.env_secret),
        ttl_s=None if args.keep_cluster else args.ttl,
        deadline_s=args.deadline or DEFAULT_DEADLINE_S,
    )


def _job_config(args: argparse.Namespace, cfg: RunConfig, name: str, mount: str) -> RunConfig:
    """The run's config as the job will see it: paths on the claim, tracking that outlives it."""
    pvc = args.pvc
    run_dir = cfg.output.run_dir or (f"{mount}/runs/{name}" if pvc else f"runs/{name}")
    if pvc and not _under(run_dir, mount):
        raise SubmitError(
            f"--run-dir {run_dir} is not on the claim mounted at {mount}, so it would be lost "
            f"with the pod; use a path under {mount} or leave --run-dir out"
        )
    storage = cfg.output.storage_path
    if pvc and storage and "://" not in storage and not _under(storage, mount):
        raise SubmitError(
            f"--storage-path {storage} is not on the claim mounted at {mount}; use a path under "
            f"{mount}, s3://..., or leave it out (default {run_dir}/tune)"
        )
    tracking = cfg.tracking
    uri = tracking.uri
    db = sqlite_path(uri) if tracking.enabled else None
    if db is not None:
        if not PurePosixPath(db).is_absolute() and pvc:
            uri = f"sqlite:///{PurePosixPath(mount) / db}"
            note(f"tracking.uri {tracking.uri} is relative: the SQLite store goes to {uri}")
        elif not (pvc and _under(db, mount)):
            raise SubmitError(
                f"tracking.uri {tracking.uri} would keep the MLflow store in the head pod, which "
                "is deleted with the RayJob; pass --tracking-uri http://MLFLOW:5000 (an MLflow "
                f"server) or --pvc CLAIM (the store then goes to {mount}/mlflow.db)"
            )
    if scrub_url(uri) != uri:
        raise SubmitError(
            "tracking.uri holds a password, and a ConfigMap is not secret; put "
            "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD in a Secret and pass --env-secret"
        )
    dump = cfg.model_dump(mode="json")
    if redact(dump) != dump:
        raise SubmitError(
            "the config holds a secret-looking value (a key, token or password), and a ConfigMap "
            "is not secret; pass it through a Secret (--env-secret) instead"
        )
    if cfg.ray.gpus_per_child > 0 and args.gpus == 0:
        raise SubmitError(
            f"ray.gpus_per_child={cfg.ray.gpus_per_child:g} asks for GPUs but --gpus is 0, so no "
            "child would ever be scheduled; pass --gpus N (GPUs per worker pod)"
        )
    if args.gpus and cfg.ray.gpus_per_child == 0:
        note(
            f"--gpus {args.gpus} but ray.gpus_per_child=0: children train on CPUs; add "
            "--set ray.gpus_per_child=0.25 to share each GPU among four children"
        )
    if not pvc:
        note(
            f"no --pvc: the run directory {run_dir} lives in the head pod and is deleted with "
            "the Ray cluster (MLflow keeps the model and results; --resume is not possible)"
        )
    raw = cfg.model_dump()
    raw["output"] = {**raw["output"], "run_dir": run_dir}
    raw["tracking"] = {**raw["tracking"], "uri": uri}
    raw["ray"] = {**raw["ray"], "address": "auto"}
    return validate_config(raw)


def _run_entrypoint(args: argparse.Namespace, cfg: RunConfig) -> list[str]:
    argv = ["python", "-m", "pipeline", *(["-v"] if args.verbose else []), "run"]
    argv += ["--preset", f"{CONFIG_DIR}/config.yaml", "--run-dir", str(cfg.output.run_dir)]
    argv += ["--tracking-uri", cfg.tracking.uri] if cfg.tracking.enabled else ["--no-tracking"]
    return [*argv, *(["--quiet"] if args.quiet else []), "--address", "auto"]


def _resume_entrypoint(args: argparse.Namespace, mount: str) -> list[str]:
    run_dir = args.resume
    if not (args.pvc and _under(run_dir, mount)):
        raise SubmitError(
            f"--resume {run_dir}: a run directory to resume must be on the claim (--pvc, "
            f"mounted at {mount}), e.g. --resume {mount}/runs/NAME"
        )
    changed = [f for f in ("preset", "overrides", "seed", "run_dir", "algo", "policy",
                           "iterations", "episodes", "env_runners", "storage_path",
                           "skip_removal", "skip_shrinkage") if getattr(args, f, None)]  # fmt: skip
    if changed:
        raise SubmitError(
            f"--resume continues the run as configured in its config.yaml; drop "
            f"--{changed[0].replace('_', '-')} (only --tracking-uri may change)"
        )
    argv = ["python", "-m", "pipeline", *(["-v"] if args.verbose else []), "run"]
    argv += ["--resume", run_dir]
    if args.tracking_uri:
        argv += ["--tracking-uri", args.tracking_uri]
    if args.no_tracking:
        argv.append("--no-tracking")
    return [*argv, *(["--quiet"] if args.quiet else []), "--address", "auto"]


def _default_image() -> str:
    try:
        return f"n2n:{version('n2n')}"
    except PackageNotFoundError:
        return "n2n:latest"


# --------------------------------------------------------------------------- manifests


def labels(plan: JobPlan, component: str) -> dict[str, str]:
    """The standard ``app.kubernetes.io/*`` labels of everything one submission creates."""
    return {
        "app.kubernetes.io/name": "n2n",
        "app.kubernetes.io/instance": plan.name,
        "app.kubernetes.io/part-of": "n2n",
        "app.kubernetes.io/managed-by": "n2n-submit",
        "app.kubernetes.io/component": component,
    }


def _metadata(plan: JobPlan, name: str, component: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if plan.namespace:
        meta["namespace"] = plan.namespace
    return {**meta, "labels": labels(plan, component)}


def configmap_name(job: str) -> str:
    """The ConfigMap holding the config of RayJob ``job``."""
    return f"{job}-config"


def configmap_manifest(plan: JobPlan) -> dict[str, Any]:
    """The ConfigMap with the validated config as ``config.yaml``."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(plan, configmap_name(plan.name), "config"),
        "data": {"config.yaml": plan.config_yaml or ""},
    }


_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
_ENV = [
    {"name": "MLFLOW_DISABLE_TELEMETRY", "value": "true"},
    {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
    {"name": "PYTHONUNBUFFERED", "value": "1"},
]


def _container(plan: JobPlan, name: str, cpus: str, memory: str, mounts: list[dict]) -> dict:
    resources = {"cpu": cpus, "memory": memory}
    limits: dict[str, Any] = dict(resources)
    if name == "ray-worker" and plan.gpus:
        limits["nvidia.com/gpu"] = plan.gpus
    container: dict[str, Any] = {
        "name": name,
        "image": plan.image,
        "imagePullPolicy": "IfNotPresent",
        "env": copy.deepcopy(_ENV),
        "resources": {"requests": resources, "limits": limits},
        "securityContext": copy.deepcopy(_SECURITY),
    }
    if name == "ray-head":
        container["ports"] = [
            {"containerPort": 6379, "name": "gcs-server"},
            {"containerPort": 8265, "name": "dashboard"},
            {"containerPort": 10001, "name": "client"},
        ]
    if plan.env_secrets:
        container["envFrom"] = [{"secretRef": {"name": s}} for s in plan.env_secrets]
    if mounts:
        container["volumeMounts"] = copy.deepcopy(mounts)
    return container


def _pod(plan: JobPlan, component: str, container: dict, volumes: list[dict]) -> dict:
    spec: dict[str, Any] = {"containers": [container]}
    if volumes:
        spec["volumes"] = copy.deepcopy(volumes)
    if component == "ray-worker" and plan.gpus:
        spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    return {"metadata": {"labels": labels(plan, component)}, "spec": spec}


def rayjob_manifest(plan: JobPlan) -> dict[str, Any]:
    """The RayJob: entrypoint, lifetime, and the Ray cluster it runs on."""
    shared_mounts, shared_volumes = [], []
    if plan.pvc:
        shared_mounts = [{"name": "shared", "mountPath": plan.pvc_mount}]
        shared_volumes = [{"name": "shared", "persistentVolumeClaim": {"claimName": plan.pvc}}]
    head_mounts, head_volumes = list(shared_mounts), list(shared_volumes)
    if plan.config_yaml is not None:
        head_mounts.append({"name": "n2n-config", "mountPath": CONFIG_DIR, "readOnly": True})
        head_volumes.append(
            {"name": "n2n-config", "configMap": {"name": configmap_name(plan.name)}}
        )
    head = _container(plan, "ray-head", plan.head_cpus, plan.head_memory, head_mounts)
    worker = _container(plan, "ray-worker", plan.worker_cpus, plan.worker_memory, shared_mounts)
    spec: dict[str, Any] = {
        "entrypoint": " ".join(_quote(a) for a in plan.entrypoint),
        "shutdownAfterJobFinishes": plan.ttl_s is not None,
        "activeDeadlineSeconds": plan.deadline_s,
        "backoffLimit": 0,
        "submissionMode": "K8sJobMode",
        "rayClusterSpec": {
            "rayVersion": RAY_VERSION,
            "authOptions": {"mode": "token"},
            "enableInTreeAutoscaling": False,
            "headGroupSpec": {
                "serviceType": "ClusterIP",
                # The head runs the driver only; every trial and child goes to the workers.
                "rayStartParams": {"num-cpus": "0"},
                "template": _pod(plan, "ray-head", head, head_volumes),
            },
            "workerGroupSpecs": [
                {
                    "groupName": "gpu-workers" if plan.gpus else "workers",
                    "replicas": plan.workers,
                    "minReplicas": plan.workers,
                    "maxReplicas": plan.workers,
                    "rayStartParams": {},
                    "template": _pod(plan, "ray-worker", worker, shared_volumes),
                }
            ],
        },
    }
    if plan.ttl_s is not None:  # KubeRay refuses a TTL without shutdownAfterJobFinishes
        spec["ttlSecondsAfterFinished"] = plan.ttl_s
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": _metadata(plan, plan.name, "search"),
        "spec": spec,
    }


def _quote(arg: str) -> str:
    """POSIX shell quoting, leaving plain words bare (the entrypoint is a shell command line)."""
    import shlex

    return arg if re.fullmatch(r"[A-Za-z0-9_./:=@%+,-]+", arg) else shlex.quote(arg)


class _ManifestDumper(yaml.SafeDumper):
    """YAML as ``kubectl`` users write it: no anchors, multi-line strings as ``|`` blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_ManifestDumper.add_representer(
    str,
    lambda dumper, text: dumper.represent_scalar(
        "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None
    ),
)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    """Manifests as one multi-document YAML text, ready for ``kubectl apply -f -``."""
    return yaml.dump_all(objects, Dumper=_ManifestDumper, sort_keys=False)


def manifests(plan: JobPlan) -> list[dict[str, Any]]:
    """The objects one submission creates, in the order ``kubectl apply`` needs them."""
    rayjob = rayjob_manifest(plan)
    return [rayjob] if plan.config_yaml is None else [configmap_manifest(plan), rayjob]


# --------------------------------------------------------------------------- the API


def api_client(args: argparse.Namespace) -> tuple[Any, str]:
    """A Kubernetes ``ApiClient`` (kubeconfig, else in-cluster) and the namespace to use."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    configuration = client.Configuration()
    in_cluster = (
        not args.kubeconfig
        and not os.environ.get("KUBECONFIG")
        and os.environ.get("KUBERNETES_SERVICE_HOST")
    )
    try:
        if in_cluster:
            config.load_incluster_config(client_configuration=configuration)
            ns_file = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
            with open(ns_file) as fh:
                namespace = fh.read().strip()
        else:
            config.load_kube_config(
                config_file=args.kubeconfig, context=args.context,
                client_configuration=configuration,
            )  # fmt: skip
            contexts, current = config.list_kube_config_contexts(config_file=args.kubeconfig)
            chosen = next((c for c in contexts if c["name"] == args.context), current)
            namespace = (chosen or {}).get("context", {}).get("namespace")
    except (ConfigException, OSError) as err:
        raise SubmitError(
            f"no usable Kubernetes configuration ({str(err).splitlines()[0]}); pass --kubeconfig "
            "FILE (or set KUBECONFIG), or run inside the cluster"
        ) from None
    return client.ApiClient(configuration), args.namespace or namespace or "default"


def _api_error(err: Any, what: str, name: str, namespace: str) -> SubmitError:
    status = getattr(err, "status", None)
    if status == 409:
        return SubmitError(
            f"{what} {name} already exists in namespace {namespace}; delete it with "
            f"n2n submit --k8s --delete {name} --namespace {namespace}, or pass another --name"
        )
    if status == 404 and what == KIND:
        return SubmitError(
            f"the Kubernetes API of namespace {namespace} knows no RayJob: install the KubeRay "
            "operator (v1.5.1 or newer) or check --namespace"
        )
    reason = (getattr(err, "reason", None) or type(err).__name__).strip()
    return SubmitError(f"the Kubernetes API refused to create {what} {name} ({status} {reason})")


def submit(args: argparse.Namespace) -> int:
    """``n2n submit --k8s``: creates the RayJob and its ConfigMap, then follows the job."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    plan = plan_job(args)
    if args.dry_run:
        sys.stdout.write(to_yaml(manifests(plan)))
        return EXIT_SUCCEEDED
    api, namespace = api_client(args)
    plan.namespace = namespace
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    try:
        created = custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, rayjob_manifest(plan), field_validation="Strict"
        )
    except ApiException as err:
        raise _api_error(err, KIND, plan.name, namespace) from None
    if plan.config_yaml is not None:
        body = configmap_manifest(plan)
        body["metadata"]["ownerReferences"] = [
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": plan.name,
             "uid": created["metadata"]["uid"]}
        ]  # fmt: skip
        try:
            core.create_namespaced_config_map(
                namespace, client.V1ConfigMap.model_validate(body), field_validation="Strict"
            )
        except ApiException as err:
            with contextlib.suppress(ApiException):  # the RayJob would wait for it forever
                custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, plan.name)
            raise _api_error(err, "ConfigMap", configmap_name(plan.name), namespace) from None
    note(
        f"created RayJob {plan.name} in namespace {namespace}: {rayjob_manifest(plan)['spec']['entrypoint']}"
    )
    hint = (
        f"status: kubectl get rayjob {plan.name} -n {namespace}; logs: kubectl logs -f "
        f"job/{plan.name} -n {namespace}; delete: n2n submit --k8s --delete {plan.name} "
        f"--namespace {namespace}"
    )
    if args.no_wait:
        note(hint)
        return EXIT_SUCCEEDED
    return follow(custom, core, namespace, plan.name, args.poll, hint)


def delete(args: argparse.Namespace) -> int:
    """``n2n submit --k8s --delete NAME``: deletes the RayJob (its Ray cluster and submitter
    go with it) and its ConfigMap."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    name = args.delete
    check_name(name)
    api, namespace = api_client(args)
    found = []
    calls = (
        ("RayJob", lambda: client.CustomObjectsApi(api).delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Foreground")),
        ("ConfigMap", lambda: client.CoreV1Api(api).delete_namespaced_config_map(
            configmap_name(name), namespace)),
    )  # fmt: skip
    for what, call in calls:
        try:
            call()
            found.append(what)
        except ApiException as err:
            if err.status != 404:
                reason = (err.reason or "").strip()
                raise SubmitError(
                    f"the Kubernetes API refused to delete {what} {name} ({err.status} {reason})"
                ) from None
    if "RayJob" not in found:
        raise SubmitError(
            f"no RayJob {name} in namespace {namespace}; check the name (kubectl get rayjobs)"
        )
    note(f"deleted RayJob {name} (with its Ray cluster) and its ConfigMap in namespace {namespace}")
    return EXIT_SUCCEEDED


# --------------------------------------------------------------------------- following


def outcome(status: dict[str, Any]) -> int:
    """``n2n submit``'s exit code for a finished RayJob's status."""
    if status.get("reason") == "DeadlineExceeded":
        return EXIT_DEADLINE
    job = status.get("jobStatus")
    if job == "SUCCEEDED" and status.get("jobDeploymentStatus") != "Failed":
        return EXIT_SUCCEEDED
    return EXIT_STOPPED if job == "STOPPED" else EXIT_FAILED


def follow(custom: Any, core: Any, namespace: str, name: str, poll_s: float, hint: str) -> int:
    """Reports status changes, streams the submitter's log, returns the job's exit code."""
    from kubernetes.client.exceptions import ApiException

    logs = SubmitterLogs(core, namespace, name)
    seen: tuple[str, str] | None = None
    try:
        while True:
            try:
                obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            except ApiException as err:
                if err.status == 404:
                    note(f"RayJob {name} was deleted")
                    return EXIT_STOPPED
                raise
            status = obj.get("status") or {}
            deployment, job = status.get("jobDeploymentStatus", ""), status.get("jobStatus", "")
            if (deployment, job) != seen:
                seen = (deployment, job)
                note(f"RayJob {name}: {deployment or 'New'}" + (f", job {job}" if job else ""))
            logs.poll()
            if deployment in TERMINAL_DEPLOYMENT or job in TERMINAL_JOB:
                logs.drain(LOG_DRAIN_S)
                code = outcome(status)
                message = (status.get("message") or "").strip().splitlines()
                end = job or deployment
                if status.get("reason"):
                    end += f" ({status['reason']})"
                note(f"RayJob {name} {end}" + (f": {message[0]}" if message else ""))
                return code
            time.sleep(poll_s)
    except KeyboardInterrupt:
        note(f"stopped following; RayJob {name} keeps running ({hint})")
        return EXIT_INTERRUPTED


class SubmitterLogs:
    """Streams the log of each submitter pod of a RayJob to stdout, once per pod, in a thread."""

    def __init__(self, core: Any, namespace: str, name: str) -> None:
        self.core, self.namespace, self.name = core, namespace, name
        self.followed: set[str] = set()
        self.thread: threading.Thread | None = None

    def poll(self) -> None:
        """Starts following a submitter pod that has started and was not followed yet."""
        if self.thread is not None and self.thread.is_alive():
            return
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"job-name={self.name}")
        for pod in sorted(pods.items, key=lambda p: p.metadata.creation_timestamp or 0):
            if pod.metadata.name in self.followed:
                continue
            if (pod.status.phase if pod.status else None) in ("Running", "Succeeded", "Failed"):
                self.followed.add(pod.metadata.name)
                self.thread = threading.Thread(
                    target=self._stream, args=(pod.metadata.name,), daemon=True
                )
                self.thread.start()
                return

    def _stream(self, pod: str) -> None:
        response = self.core.read_namespaced_pod_log(
            pod, self.namespace, container=SUBMITTER_CONTAINER, follow=True,
            _preload_content=False,
        )  # fmt: skip
        try:
            for chunk in response.stream(4096):
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
        finally:
            response.release_conn()

    def drain(self, timeout_s: float) -> None:
        """Picks up a pod not followed yet, then waits for the stream to end."""
        self.poll()
        if self.thread is not None:
            self.thread.join(timeout_s)
