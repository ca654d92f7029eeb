"""The KubeRay operator's own admission rules for RayJob and RayCluster, applied offline.

A RayJob can pass ``helm lint`` and the CRD's OpenAPI schema and still be refused by the
operator, which checks more in Go before it creates anything (the RayJob then sits with
``jobDeploymentStatus: ValidationFailed``). No operator can run here, so this module ports those
checks: ``ValidateRayJobMetadata``, ``ValidateRayJobSpec``, ``ValidateRayClusterMetadata`` and
``ValidateRayClusterSpec`` of ``ray-operator/controllers/ray/utils/validation.go`` in KubeRay's
v1.7 line (the release whose CRDs the tests validate against), with the constants of
``utils/constant.go`` and the v1.7 default feature gates. The messages are KubeRay's.

Left out: rules on fields this project never sets (GCS fault-tolerance storage backends, mTLS,
the history-server collector's environment, RayService upgrades, per-group priorities). A body
that sets those gets a ``NotImplementedError`` rather than a silent pass.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

MAX_RAYCLUSTER_NAME_LENGTH = 53  # 63 - len("-serve-svc"): KubeRay's longest Service suffix
MAX_RAYJOB_NAME_LENGTH = MAX_RAYCLUSTER_NAME_LENGTH - 6  # KubeRay appends "-xxxxx" for the cluster
MIN_TOKEN_AUTH_RAY_VERSION = (2, 52, 0)
MIN_K8S_TOKEN_AUTH_RAY_VERSION = (2, 55, 0)

# KubeRay v1.7's default feature gates (ray-operator/pkg/features/features.go).
V1_7_FEATURE_GATES = {
    "RayClusterStatusConditions": True,
    "RayJobDeletionPolicy": True,  # beta and on since v1.6
    "RayMultiHostIndexing": True,
    "RayServiceIncrementalUpgrade": True,
    "RayCronJob": False,
    "SidecarSubmitterRestart": False,
    "RayClusterNetworkPolicy": False,
    "GCSFaultToleranceEmbeddedStorage": False,
    "RayClusterMTLS": False,
    "RayClusterHistoryServer": False,
    "KubernetesWAS": False,
}

_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# Fields whose detailed rules are not ported; without their feature gate KubeRay refuses them
# outright, and that part is.
_GATED_FIELDS = {
    "historyServerOptions": "RayClusterHistoryServer",
    "tlsOptions": "RayClusterMTLS",
    "networkPolicy": "RayClusterNetworkPolicy",
}


class Refused(ValueError):
    """The operator would refuse the object; the message is KubeRay's."""


def refusal(obj: dict[str, Any], feature_gates: dict[str, bool] | None = None) -> str | None:
    """KubeRay's reason to refuse a RayJob or RayCluster body, or None if it accepts it.

    Args:
        obj: the object as it would be applied (``kind`` RayJob or RayCluster).
        feature_gates: the operator's feature gates; KubeRay v1.7's defaults when None.
    """
    gates = V1_7_FEATURE_GATES if feature_gates is None else feature_gates
    try:
        if obj["kind"] == "RayJob":
            validate_rayjob_metadata(obj.get("metadata", {}))
            validate_rayjob_spec(obj, gates)
        elif obj["kind"] == "RayCluster":
            validate_raycluster_metadata(obj.get("metadata", {}))
            validate_raycluster_spec(obj["spec"], obj.get("metadata", {}).get("annotations"), gates)
        else:
            raise ValueError(f"not a KubeRay kind: {obj['kind']}")
    except Refused as err:
        return str(err)
    return None


# --------------------------------------------------------------------------- metadata


def _dns1035_errors(name: str) -> bool:
    return len(name) > 63 or not _DNS1035_LABEL.match(name)


def validate_raycluster_metadata(metadata: dict[str, Any]) -> None:
    name = metadata.get("name", "")
    if len(name) > MAX_RAYCLUSTER_NAME_LENGTH:
        raise Refused(
            f"RayCluster name should be no more than {MAX_RAYCLUSTER_NAME_LENGTH} characters"
        )
    if _dns1035_errors(name):
        raise Refused("RayCluster name should be a valid DNS1035 label")


def validate_rayjob_metadata(metadata: dict[str, Any]) -> None:
    name = metadata.get("name", "")
    if len(name) > MAX_RAYJOB_NAME_LENGTH:
        raise Refused(
            "The RayJob metadata is invalid: RayJob name should be no more than "
            f"{MAX_RAYJOB_NAME_LENGTH} characters"
        )
    if _dns1035_errors(name):
        raise Refused("The RayJob metadata is invalid: RayJob name should be a valid DNS1035 label")


# --------------------------------------------------------------------------- RayCluster spec


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", []) or []}


def _autoscaling(spec: dict[str, Any] | None) -> bool:
    return bool(spec and spec.get("enableInTreeAutoscaling"))


def _autoscaler_v2(spec: dict[str, Any]) -> bool:
    if (spec.get("autoscalerOptions") or {}).get("version") == "v2":
        return True
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    return _env(head).get("RAY_enable_autoscaler_v2", {}).get("value") in ("1", "true")


def _ray_version(text: str) -> tuple[int, ...]:
    match = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    if not match:
        raise Refused(f"authOptions.mode is 'token' but RayVersion format is invalid: {text}")
    return tuple(int(part or 0) for part in match.groups())


def _group_resources(name: str, params: dict[str, str], resources: dict[str, str] | None) -> None:
    if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and resources:
        raise Refused(
            f"resource fields should not be set in both rayStartParams and Resources for {name} "
            "group; please use only one"
        )


def _group_labels(name: str, params: dict[str, str], labels: dict[str, str] | None) -> None:
    if "labels" in params:
        raise Refused(
            f"rayStartParams['labels'] is not supported for {name} group; please use the "
            "top-level Labels field instead"
        )
    for key, value in (labels or {}).items():
        prefix, _, base = key.rpartition("/")
        bad_key = (
            not base
            or len(base) > 63
            or not _QUALIFIED_NAME.match(base)
            or (prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix)))
        )
        if bad_key:
            raise Refused(f"invalid label key for {name} group: '{key}'")
        if len(value) > 63 or not _LABEL_VALUE.match(value):
            raise Refused(f"invalid label value for key '{key}' in {name} group: '{value}'")


def validate_raycluster_spec(
    spec: dict[str, Any], annotations: dict[str, str] | None, gates: dict[str, bool]
) -> None:
    annotations = annotations or {}
    for field, gate in _GATED_FIELDS.items():
        if spec.get(field) is not None and gates.get(gate):
            raise NotImplementedError(f"spec.{field} rules are not ported")
    head_group = spec["headGroupSpec"]
    containers = head_group["template"]["spec"].get("containers") or []
    if not containers:
        raise Refused("headGroupSpec should have at least one container")
    head_params = head_group.get("rayStartParams") or {}
    _group_resources("Head", head_params, head_group.get("resources"))
    _group_labels("Head", head_params, head_group.get("labels"))

    autoscaling = _autoscaling(spec)
    for group in spec.get("workerGroupSpecs") or []:
        name = group.get("groupName", "")
        if not group["template"]["spec"].get("containers"):
            raise Refused("workerGroupSpec should have at least one container")
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (low is None or high is None):
            raise Refused(
                f"worker group {name} must set both minReplicas and maxReplicas when autoscaling "
                "is disabled"
            )
        if low is not None and low < 0:
            raise Refused(f"worker group {name} has negative minReplicas {low}")
        if high is not None and high < 0:
            raise Refused(f"worker group {name} has negative maxReplicas {high}")
        if low is not None and high is not None and low > high:
            raise Refused(
                f"worker group {name} has minReplicas {low} greater than maxReplicas {high}"
            )
        params = group.get("rayStartParams") or {}
        _group_resources(name, params, group.get("resources"))
        _group_labels(name, params, group.get("labels"))
        idle = group.get("idleTimeoutSeconds")
        if idle is not None:
            if idle < 0:
                raise Refused(
                    f"worker group {name}: idleTimeoutSeconds must be non-negative, got {idle}"
                )
            if not _autoscaler_v2(spec):
                raise Refused(
                    f"worker group {name}: idleTimeoutSeconds is set, but autoscaler v2 is not "
                    "enabled"
                )
        if group.get("priority") is not None:
            raise NotImplementedError("worker group priority rules are not ported")

    head = containers[0]
    head_env = _env(head)
    ft_options = spec.get("gcsFaultToleranceOptions")
    if annotations.get("ray.io/ft-enabled") and ft_options is not None:
        raise Refused(
            "ray.io/ft-enabled annotation and GcsFaultToleranceOptions are both set. Please use "
            "only GcsFaultToleranceOptions to configure GCS fault tolerance"
        )
    ft_enabled = ft_options is not None or annotations.get("ray.io/ft-enabled") == "true"
    if not ft_enabled and "RAY_REDIS_ADDRESS" in head_env:
        raise Refused(
            "RAY_REDIS_ADDRESS is set which implicitly enables GCS fault tolerance, but "
            "GcsFaultToleranceOptions is not set. Please set GcsFaultToleranceOptions to enable "
            "GCS fault tolerance"
        )
    if ft_options is not None:
        if head_params.get("redis-password"):
            raise Refused(
                "cannot set `redis-password` in rayStartParams when GcsFaultToleranceOptions is "
                "enabled - use GcsFaultToleranceOptions.RedisPassword instead"
            )
        for var in ("REDIS_PASSWORD", "RAY_REDIS_ADDRESS"):
            if var in head_env:
                raise Refused(
                    f"cannot set `{var}` env var in head Pod when GcsFaultToleranceOptions is enabled"
                )
        if annotations.get("ray.io/external-storage-namespace"):
            raise Refused(
                "cannot set `ray.io/external-storage-namespace` annotation when "
                "GcsFaultToleranceOptions is enabled"
            )
        if ft_options.get("backend", "redis") != "redis" or ft_options.get("storage"):
            raise NotImplementedError("GCS fault-tolerance storage backend rules are not ported")
    if head_params.get("redis-username") or "REDIS_USERNAME" in head_env:
        raise Refused(
            "cannot set redis username in rayStartParams or environment variables - use "
            "GcsFaultToleranceOptions.RedisUsername instead"
        )

    for group in spec.get("workerGroupSpecs") or []:
        if group.get("suspend"):
            if not gates.get("RayJobDeletionPolicy"):
                raise Refused(
                    f"worker group {group['groupName']} can be suspended only when the "
                    "RayJobDeletionPolicy feature gate is enabled"
                )
            if autoscaling:
                raise Refused(
                    f"worker group {group['groupName']} cannot be suspended with Autoscaler enabled"
                )
    v2_env = head_env.get("RAY_enable_autoscaler_v2", {}).get("value")
    if not autoscaling and v2_env in ("1", "true"):
        raise Refused(
            f"environment variable RAY_enable_autoscaler_v2 cannot be set to '{v2_env}' when "
            "enableInTreeAutoscaling is false. Please set enableInTreeAutoscaling: true to use "
            "autoscaler v2"
        )
    options = spec.get("autoscalerOptions") or {}
    if autoscaling:
        if options.get("version") is not None and "RAY_enable_autoscaler_v2" in head_env:
            raise Refused(
                "both .spec.autoscalerOptions.version and head Pod env var "
                "RAY_enable_autoscaler_v2 are set, please only use the former"
            )
        if _autoscaler_v2(spec):
            pods = [("head Pod", head_group["template"])] + [
                (f"worker group {g['groupName']}", g["template"])
                for g in spec.get("workerGroupSpecs") or []
            ]
            for where, template in pods:
                if template["spec"].get("restartPolicy", "Never") != "Never":
                    raise Refused(
                        f"restartPolicy for {where} should be Never or unset when using "
                        "autoscaler V2"
                    )
    idle = options.get("idleTimeoutSeconds")
    if idle is not None and idle < 0:
        raise Refused(f"autoscalerOptions.idleTimeoutSeconds must be non-negative, got {idle}")
    if any(e.get("name") == "KUBERAY_GEN_AUTOSCALER_START_CMD" for e in options.get("env") or []):
        raise Refused(
            "autoscalerOptions.env must not contain KUBERAY_GEN_AUTOSCALER_START_CMD: it is "
            "managed by KubeRay and injected automatically into the autoscaler container"
        )
    if spec.get("historyServerOptions") is not None:
        raise Refused("RayClusterHistoryServer feature gate is not enabled")

    auth = spec.get("authOptions") or {}
    k8s_token = bool(auth.get("enableK8sTokenAuth"))
    if auth.get("mode") == "token":
        if not spec.get("rayVersion"):
            raise Refused(
                "authOptions.mode is 'token' but RayVersion was not specified. Ray version 2.52.0 "
                "or later is required"
            )
        version = _ray_version(spec["rayVersion"])
        if version < MIN_TOKEN_AUTH_RAY_VERSION:
            raise Refused(
                "authOptions.mode is 'token' but minimum Ray version is 2.52.0, got "
                f"{spec['rayVersion']}"
            )
        if k8s_token:
            if version < MIN_K8S_TOKEN_AUTH_RAY_VERSION:
                raise Refused(
                    "authOptions.enableK8sTokenAuth is enabled but minimum Ray version is 2.55.0, "
                    f"got {spec['rayVersion']}"
                )
            if auth.get("secretName"):
                raise Refused(
                    "authOptions.enableK8sTokenAuth is enabled and authOptions.secretName is also "
                    "set"
                )
    elif k8s_token:
        raise Refused(
            "authOptions.enableK8sTokenAuth is enabled but authOptions.mode not set to 'token'"
        )
    if spec.get("networkPolicy") is not None:
        raise Refused(
            "spec.networkPolicy requires the RayClusterNetworkPolicy feature gate to be enabled"
        )
    if spec.get("tlsOptions") is not None:
        raise Refused("spec.tlsOptions requires the RayClusterMTLS feature gate to be enabled")


# --------------------------------------------------------------------------- RayJob spec


def _validate_deletion(spec: dict[str, Any], gates: dict[str, bool]) -> None:
    shutdown = bool(spec.get("shutdownAfterJobFinishes"))
    if not shutdown and (spec.get("ttlSecondsAfterFinished") or 0) > 0:
        raise Refused(
            "The RayJob spec is invalid: a RayJob with shutdownAfterJobFinishes set to false "
            "cannot have TTLSecondsAfterFinished"
        )
    strategy = spec.get("deletionStrategy")
    if strategy is None:
        return
    if not gates.get("RayJobDeletionPolicy"):
        raise Refused("RayJobDeletionPolicy feature gate must be enabled to use DeletionStrategy")
    legacy = strategy.get("onSuccess") is not None or strategy.get("onFailure") is not None
    rules = strategy.get("deletionRules") or []
    if rules and shutdown:
        raise Refused(
            "The RayJob spec is invalid: spec.shutdownAfterJobFinishes and "
            "spec.deletionStrategy.deletionRules are mutually exclusive"
        )
    if rules and legacy:
        raise Refused(
            "The RayJob spec is invalid: Cannot use both legacy onSuccess/onFailure fields and "
            "deletionRules simultaneously"
        )
    selector_mode = bool(spec.get("clusterSelector"))
    autoscaling = _autoscaling(spec.get("rayClusterSpec"))
    if legacy:
        on_success, on_failure = strategy.get("onSuccess"), strategy.get("onFailure")
        if on_success is None or on_failure is None:
            raise Refused(
                "both DeletionStrategy.OnSuccess and DeletionStrategy.OnFailure must be set when "
                "using the legacy deletion policy fields of DeletionStrategy"
            )
        policies = (on_success.get("policy"), on_failure.get("policy"))
        if None in policies:
            raise Refused("the DeletionPolicyType field of DeletionStrategy cannot be unset")
        if selector_mode and {"DeleteCluster", "DeleteWorkers"} & set(policies):
            raise Refused("the ClusterSelector mode doesn't support this DeletionStrategy")
        if "DeleteWorkers" in policies and autoscaling:
            raise Refused(
                "DeletionStrategy=DeleteWorkers currently does not support RayCluster with "
                "autoscaling enabled"
            )
        if shutdown and "DeleteNone" in policies:
            raise Refused(
                "The RayJob spec is invalid: shutdownAfterJobFinshes is set to 'true' while "
                "deletion policy is 'DeleteNone'"
            )
        return
    if not rules:
        raise Refused(
            "The RayJob spec is invalid: DeletionStrategy requires either BOTH onSuccess and "
            "onFailure, OR the deletionRules field (cannot be empty)"
        )
    errors: list[str] = []
    ttls: dict[tuple[str, str], dict[str, int]] = {}
    for i, rule in enumerate(rules):
        condition = rule.get("condition") or {}
        has_status, has_deployment = "jobStatus" in condition, "jobDeploymentStatus" in condition
        if has_status and has_deployment:
            errors.append(
                f"deletionRules[{i}]: cannot set both JobStatus and JobDeploymentStatus at the same time"
            )
            continue
        if not has_status and not has_deployment:
            errors.append(
                f"deletionRules[{i}]: exactly one of JobStatus and JobDeploymentStatus must be set"
            )
            continue
        ttl = condition.get("ttlSeconds", 0)
        if ttl < 0:
            errors.append(f"deletionRules[{i}]: TTLSeconds must be non-negative")
            continue
        policy = rule["policy"]
        if selector_mode and policy in ("DeleteCluster", "DeleteWorkers"):
            errors.append(
                f"deletionRules[{i}]: DeletionPolicyType '{policy}' not supported when ClusterSelector is set"
            )
            continue
        if autoscaling and policy == "DeleteWorkers":
            errors.append(
                f"deletionRules[{i}]: DeletionPolicyType 'DeleteWorkers' not supported with autoscaling enabled"
            )
            continue
        key = ("JobStatus", condition["jobStatus"]) if has_status else (
            "JobDeploymentStatus", condition["jobDeploymentStatus"])  # fmt: skip
        group = ttls.setdefault(key, {})
        if policy in group:
            errors.append(
                f"deletionRules[{i}]: duplicate rule for DeletionPolicyType '{policy}' and {key[0]} '{key[1]}'"
            )
            continue
        group[policy] = ttl
    for (kind, value), group in ttls.items():
        previous: tuple[str, int] | None = None
        for policy in ("DeleteWorkers", "DeleteCluster", "DeleteSelf"):
            if policy not in group:
                continue
            if previous and group[policy] < previous[1]:
                errors.append(
                    f"for {kind} '{value}': {policy} TTL ({group[policy]}) must be >= "
                    f"{previous[0]} TTL ({previous[1]})"
                )
            previous = (policy, group[policy])
    if errors:
        raise Refused("\n".join(errors))


def validate_rayjob_spec(rayjob: dict[str, Any], gates: dict[str, bool]) -> None:
    spec = rayjob["spec"]
    shutdown = bool(spec.get("shutdownAfterJobFinishes"))
    if spec.get("suspend") and not shutdown:
        raise Refused(
            "The RayJob spec is invalid: a RayJob with shutdownAfterJobFinishes set to false is "
            "not allowed to be suspended"
        )
    if (spec.get("ttlSecondsAfterFinished") or 0) < 0:
        raise Refused(
            "The RayJob spec is invalid: TTLSecondsAfterFinished must be a non-negative integer"
        )
    _validate_deletion(spec, gates)

    selector = spec.get("clusterSelector") or {}
    mode = spec.get("submissionMode", "K8sJobMode")
    backoff = spec.get("backoffLimit")
    if spec.get("suspend") and selector:
        raise Refused(
            "The RayJob spec is invalid: the ClusterSelector mode doesn't support the suspend "
            "operation"
        )
    if spec.get("rayClusterSpec") is None and not selector:
        raise Refused(
            "The RayJob spec is invalid: one of RayClusterSpec or ClusterSelector must be set"
        )
    if selector:
        if not selector.get("ray.io/cluster"):
            raise Refused("cluster name in ClusterSelector should not be empty")
        if mode == "SidecarMode":
            raise Refused("ClusterSelector is not supported in SidecarMode")
        if backoff is not None and backoff > 0:
            raise Refused(
                "The RayJob spec is invalid: BackoffLimit is incompatible with ClusterSelector mode"
            )
    if mode == "InteractiveMode" and backoff is not None and backoff > 0:
        raise Refused(
            "The RayJob spec is invalid: BackoffLimit is incompatible with InteractiveMode"
        )
    if mode == "SidecarMode":
        if spec.get("submitterPodTemplate") is not None:
            raise Refused("Currently, SidecarMode doesn't support SubmitterPodTemplate")
        if spec.get("submitterConfig") is not None:
            raise Refused("Currently, SidecarMode doesn't support SubmitterConfig")
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        if head.get("restartPolicy", "Never") != "Never":
            raise Refused(
                "restartPolicy for head Pod should be Never or unset when using SidecarMode"
            )
    cluster = spec.get("rayClusterSpec")
    if cluster is not None:
        if (cluster.get("authOptions") or {}).get("enableK8sTokenAuth"):
            raise Refused(
                "The RayJob spec is invalid: K8s token auth mode is currently not supported for "
                "RayJob"
            )
        try:
            validate_raycluster_spec(
                cluster, (rayjob.get("metadata") or {}).get("annotations"), gates
            )
        except Refused as err:
            raise Refused(f"The RayJob spec is invalid: {err}") from None
    runtime_env = spec.get("runtimeEnvYAML")
    if runtime_env:
        try:
            yaml.safe_load(runtime_env)
        except yaml.YAMLError as err:
            raise Refused(f"failed to unmarshal RuntimeEnvYAML: {err}") from None
    if spec.get("activeDeadlineSeconds") is not None and spec["activeDeadlineSeconds"] <= 0:
        raise Refused(
            "The RayJob spec is invalid: activeDeadlineSeconds must be a positive integer"
        )
    pre_running = spec.get("preRunningDeadlineSeconds")
    if pre_running is not None and pre_running <= 0:
        raise Refused(
            "The RayJob spec is invalid: preRunningDeadlineSeconds must be a positive integer"
        )
    if backoff is not None and backoff < 0:
        raise Refused("The RayJob spec is invalid: backoffLimit must be a positive integer")


def strict_schema(schema: Any) -> Any:
    """A copy of a CRD schema that rejects unknown fields where the API server would prune them
    (as ``kubectl --validate=strict`` does)."""
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict_schema(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
        and out["properties"].keys() - {"apiVersion", "kind", "metadata"}
    ):
        out["additionalProperties"] = False
    return out
