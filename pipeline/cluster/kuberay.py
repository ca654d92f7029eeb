"""``n2n submit --k8s``: the RayJob (``pipeline.cluster.rayjob``) created through the Kubernetes
API (the ``kubernetes`` client, with the kubeconfig or the in-cluster config) and followed.

:func:`follow` polls ``status.jobDeploymentStatus``/``status.jobStatus``, streams the submitter
pod's log (KubeRay's submitter Job, named like the RayJob, runs ``ray job submit`` and then
``ray job logs --follow``) and maps the end to ``n2n submit``'s exit codes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
from typing import Any

from pipeline.cluster.entrypoint import SubmitError, note
from pipeline.cluster.rayjob import (
    GROUP,
    KIND,
    LOG_DRAIN_S,
    PLURAL,
    SUBMITTER_CONTAINER,
    TERMINAL_DEPLOYMENT,
    TERMINAL_JOB,
    VERSION,
    check_name,
    configmap_manifest,
    configmap_name,
    manifests,
    plan_job,
    rayjob_manifest,
    to_yaml,
)
from pipeline.config.exits import Exit


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
        return Exit.OK
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
        return Exit.OK
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
    return Exit.OK


# --------------------------------------------------------------------------- following


def outcome(status: dict[str, Any]) -> int:
    """``n2n submit``'s exit code for a finished RayJob's status."""
    if status.get("reason") == "DeadlineExceeded":
        return Exit.DEADLINE
    job = status.get("jobStatus")
    if job == "SUCCEEDED" and status.get("jobDeploymentStatus") != "Failed":
        return Exit.OK
    return Exit.STOPPED if job == "STOPPED" else Exit.FAILED


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
                    return Exit.STOPPED
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
        return Exit.INTERRUPTED


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
