"""The RayJob of ``n2n submit --k8s``: what is checked before anything is sent, and the
manifests (``pipeline.cluster.kuberay`` sends them and follows the job).

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
"""

from __future__ import annotations

import argparse
import copy
import re
import secrets
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import PurePosixPath
from typing import Any

import yaml

from pipeline.cluster.entrypoint import SubmitError, job_name, note, run_command, tracking_flags
from pipeline.config.flags import not_resumable, overrides
from pipeline.config.presets import DEFAULT_PRESET, load_config, validate_config
from pipeline.config.schema import RunConfig
from pipeline.tracking.redaction import redact, scrub_url
from pipeline.tracking.store import sqlite_path

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
        cfg = load_config(args.preset or DEFAULT_PRESET, [*args.overrides, *overrides(args)])
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
    return run_command(
        str(cfg.output.run_dir), preset=f"{CONFIG_DIR}/config.yaml",
        tracking=tracking_flags(cfg.tracking.enabled, cfg.tracking.uri),
        verbose=args.verbose, quiet=args.quiet,
    )  # fmt: skip


def _resume_entrypoint(args: argparse.Namespace, mount: str) -> list[str]:
    run_dir = args.resume
    if not (args.pvc and _under(run_dir, mount)):
        raise SubmitError(
            f"--resume {run_dir}: a run directory to resume must be on the claim (--pvc, "
            f"mounted at {mount}), e.g. --resume {mount}/runs/NAME"
        )
    if flag := not_resumable(args):
        raise SubmitError(
            f"--resume continues the run as configured in its config.yaml; drop "
            f"{flag} (only --tracking-uri may change)"
        )
    return run_command(
        run_dir, resume=True, tracking=tracking_flags(not args.no_tracking, args.tracking_uri),
        verbose=args.verbose, quiet=args.quiet,
    )  # fmt: skip


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
