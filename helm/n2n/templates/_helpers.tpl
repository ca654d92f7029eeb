{{/* vim: set filetype=mustache: */}}
{{/*
Expand the name of the chart.
*/}}
{{- define "n2n.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
A default fully qualified app name, truncated at 63 characters (the DNS label limit).
If the release name contains the chart name it is used as the full name.
*/}}
{{- define "n2n.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "n2n.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Common labels.
*/}}
{{- define "n2n.labels" -}}
helm.sh/chart: {{ include "n2n.chart" . }}
{{ include "n2n.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: n2n
{{- end -}}

{{/*
Selector labels (add app.kubernetes.io/component per workload).
*/}}
{{- define "n2n.selectorLabels" -}}
app.kubernetes.io/name: {{ include "n2n.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
The n2n image.
*/}}
{{- define "n2n.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
MLflow: name of its Deployment, Service and PVC; its image; the tracking URI the job uses.
*/}}
{{- define "n2n.mlflow.fullname" -}}
{{- printf "%s-mlflow" (include "n2n.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "n2n.mlflow.image" -}}
{{- $repository := default .Values.image.repository .Values.mlflow.image.repository -}}
{{- $tag := default (default .Chart.AppVersion .Values.image.tag) .Values.mlflow.image.tag -}}
{{- printf "%s:%s" $repository $tag -}}
{{- end -}}

{{/*
The MLflow login Secret: the user's, or the one the chart generates.
*/}}
{{- define "n2n.mlflow.authSecretName" -}}
{{- default (printf "%s-auth" (include "n2n.mlflow.fullname" .)) .Values.mlflow.auth.existingSecret -}}
{{- end -}}

{{/*
True (non-empty) when the Ray side logs in to the chart's own MLflow server.
*/}}
{{- define "n2n.mlflow.loginFromSecret" -}}
{{- if and .Values.mlflow.enabled .Values.mlflow.auth.enabled (not .Values.tracking.uri) -}}true{{- end -}}
{{- end -}}

{{/*
The shared volume for run directories, Tune storage and the reward cache: its claim name, or
empty when `sharedVolume.enabled` is false.
*/}}
{{- define "n2n.sharedVolume.claimName" -}}
{{- if .Values.sharedVolume.enabled -}}
{{- default (printf "%s-results" (include "n2n.fullname" .)) .Values.sharedVolume.existingClaim -}}
{{- end -}}
{{- end -}}

{{/*
The run directory the job writes to (and resumes from): `output.runDir`, or a folder named after
the release on the shared volume; empty leaves n2n's own default.
*/}}
{{- define "n2n.runDir" -}}
{{- if .Values.output.runDir -}}
{{- .Values.output.runDir -}}
{{- else if include "n2n.sharedVolume.claimName" . -}}
{{- printf "%s/runs/%s" (trimSuffix "/" .Values.sharedVolume.mountPath) (include "n2n.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "n2n.trackingUri" -}}
{{- if .Values.tracking.uri -}}
{{- .Values.tracking.uri -}}
{{- else -}}
{{- printf "http://%s:%v" (include "n2n.mlflow.fullname" .) .Values.mlflow.service.port -}}
{{- end -}}
{{- end -}}

{{/*
Host header values MLflow accepts (its --allowed-hosts): every in-cluster name of the Service,
with and without a port, localhost for `kubectl port-forward`, and the user's extra hosts.
MLflow compares the whole Host header (name:port) and answers 403 to anything else.
*/}}
{{- define "n2n.mlflow.allowedHosts" -}}
{{- $svc := include "n2n.mlflow.fullname" . -}}
{{- $ns := .Release.Namespace -}}
{{- $hosts := list -}}
{{- range $name := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns $.Values.clusterDomain) "localhost" "127.0.0.1" -}}
{{- $hosts = append $hosts $name -}}
{{- $hosts = append $hosts (printf "%s:*" $name) -}}
{{- end -}}
{{- concat $hosts .Values.mlflow.allowedHosts | uniq | join "," -}}
{{- end -}}

{{/*
Quotes a string for a POSIX shell, unless it is made only of safe characters. The RayJob
entrypoint is a shell command line (`ray job submit -- <entrypoint>`).
*/}}
{{- define "n2n.shellQuote" -}}
{{- $s := toString . -}}
{{- if regexMatch "^[A-Za-z0-9_./:=@%+,-]+$" $s -}}
{{- $s -}}
{{- else -}}
{{- printf "'%s'" (replace "'" "'\\''" $s) -}}
{{- end -}}
{{- end -}}

{{/*
Checks that values agree with each other and with what the KubeRay operator accepts (types and
ranges are values.schema.json's job). Rendered once by every template that needs it, so any of
them fails with the same message. KubeRay's own rules are in ray-operator/controllers/ray/utils/
validation.go (ValidateRayJobMetadata, ValidateRayJobSpec, ValidateRayClusterMetadata);
tests/kuberay_rules.py applies them to every rendering.
*/}}
{{- define "n2n.validate" -}}
{{- $name := include "n2n.fullname" . -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) -}}
{{- fail (printf "the resource name %q (from the release name) must start with a lowercase letter and hold only lowercase letters, digits and '-', as KubeRay and Kubernetes Service names require: install under a release name like n2n-%s, or set fullnameOverride" $name (regexReplaceAll "[^-a-z0-9]" $name "-")) -}}
{{- end -}}
{{- $maxName := ternary 47 53 .Values.job.enabled -}}
{{- if gt (len $name) $maxName -}}
{{- fail (printf "the %s name %q has %d characters and KubeRay refuses more than %d (it adds a suffix for the cluster's own objects): use a shorter release name or set fullnameOverride" (ternary "RayJob" "RayCluster" .Values.job.enabled) $name (len $name) $maxName) -}}
{{- end -}}
{{- if and (not .Values.tracking.uri) (not .Values.mlflow.enabled) -}}
{{- fail "tracking.uri is empty and mlflow.enabled is false: set tracking.uri to your MLflow server (http://host:port) or mlflow.enabled=true" -}}
{{- end -}}
{{- if and .Values.mlflow.enabled (ne .Values.mlflow.service.type "ClusterIP") (not .Values.mlflow.auth.enabled) -}}
{{- fail (printf "mlflow.service.type=%s exposes MLflow outside the cluster, and mlflow.auth.enabled=false would let anyone read and change every run: set mlflow.auth.enabled=true, or keep mlflow.service.type=ClusterIP and use kubectl port-forward" .Values.mlflow.service.type) -}}
{{- end -}}
{{- $gpusPerChild := .Values.ray.gpusPerChild | default 0 | float64 -}}
{{- if and (gt $gpusPerChild 0.0) (eq (int .Values.ray.workers.gpus) 0) -}}
{{- fail (printf "ray.gpusPerChild=%v asks for GPUs but ray.workers.gpus=0, so children would never be scheduled: set ray.workers.gpus to the GPUs of each worker pod (for example 1)" .Values.ray.gpusPerChild) -}}
{{- end -}}
{{- $groups := list (list "ray.workers" .Values.ray.workers) -}}
{{- if .Values.ray.cpuWorkers.enabled -}}
{{- $groups = append $groups (list "ray.cpuWorkers" .Values.ray.cpuWorkers) -}}
{{- if eq .Values.ray.cpuWorkers.groupName .Values.ray.workers.groupName -}}
{{- fail (printf "ray.cpuWorkers.groupName and ray.workers.groupName are both %q, and each worker group needs its own name: rename one" .Values.ray.workers.groupName) -}}
{{- end -}}
{{- end -}}
{{- range $groups -}}
{{- $key := index . 0 -}}
{{- $w := index . 1 -}}
{{- if or (gt (int $w.minReplicas) (int $w.replicas)) (gt (int $w.replicas) (int $w.maxReplicas)) -}}
{{- fail (printf "%s needs minReplicas <= replicas <= maxReplicas, got %v <= %v <= %v: fix the three values" $key $w.minReplicas $w.replicas $w.maxReplicas) -}}
{{- end -}}
{{- end -}}
{{- include "n2n.validateDeletion" . -}}
{{- if and .Values.job.enabled (not (include "n2n.runDir" .)) -}}
{{- fail "sharedVolume.enabled=false and output.runDir is empty, so the run directory would be a relative path in the head pod, which n2n refuses inside a Ray job because it dies with the cluster: keep sharedVolume.enabled=true (a ReadWriteMany claim), or set output.runDir to an absolute path (and output.storagePath=s3://... for the checkpoints)" -}}
{{- end -}}
{{- if .Values.job.resume -}}
{{- if ne .Values.job.command "run" -}}
{{- fail (printf "job.resume=true continues an `n2n run`, but job.command=%s: set job.command=run" .Values.job.command) -}}
{{- end -}}
{{- if or .Values.job.overrides .Values.job.config -}}
{{- fail "job.resume=true continues the run with its own saved config, so job.overrides and job.config would be ignored: remove them" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
KubeRay's rules for shutdownAfterJobFinishes, ttlSecondsAfterFinished and deletionStrategy
(validateDeletionConfiguration, validateDeletionRules in KubeRay's validation.go).
*/}}
{{- define "n2n.validateDeletion" -}}
{{- $job := .Values.job -}}
{{- if and (not $job.shutdownAfterJobFinishes) (gt (int $job.ttlSecondsAfterFinished) 0) -}}
{{- fail (printf "job.ttlSecondsAfterFinished=%v only applies with job.shutdownAfterJobFinishes=true, and KubeRay refuses a RayJob that sets it otherwise: set job.ttlSecondsAfterFinished=0 (job.deletionStrategy decides what is deleted when), or job.shutdownAfterJobFinishes=true with job.deletionStrategy=null" $job.ttlSecondsAfterFinished) -}}
{{- end -}}
{{- $rules := list -}}
{{- with $job.deletionStrategy -}}{{- $rules = .deletionRules | default list -}}{{- end -}}
{{- if and $job.shutdownAfterJobFinishes $rules -}}
{{- fail "job.shutdownAfterJobFinishes=true and job.deletionStrategy.deletionRules are mutually exclusive in KubeRay: set job.deletionStrategy=null to delete by the TTL, or job.shutdownAfterJobFinishes=false to delete by the rules" -}}
{{- end -}}
{{- $ttls := dict -}}
{{- range $i, $rule := $rules -}}
{{- $c := $rule.condition -}}
{{- $status := ternary (printf "jobStatus %s" ($c.jobStatus | toString)) (printf "jobDeploymentStatus %s" ($c.jobDeploymentStatus | toString)) (hasKey $c "jobStatus") -}}
{{- if and (eq $rule.policy "DeleteWorkers") $.Values.ray.autoscaling.enabled -}}
{{- fail (printf "job.deletionStrategy.deletionRules[%d] uses DeleteWorkers, which KubeRay refuses while ray.autoscaling.enabled=true: use DeleteCluster, or turn autoscaling off" $i) -}}
{{- end -}}
{{- $key := printf "%s/%s" $status $rule.policy -}}
{{- if hasKey $ttls $key -}}
{{- fail (printf "job.deletionStrategy.deletionRules has two %s rules for %s, and KubeRay refuses duplicates: keep one" $rule.policy $status) -}}
{{- end -}}
{{- $_ := set $ttls $key (int ($c.ttlSeconds | default 0)) -}}
{{- end -}}
{{- range $key, $ttl := $ttls -}}
{{- $status := index (splitList "/" $key) 0 -}}
{{- $policy := index (splitList "/" $key) 1 -}}
{{- $order := list "DeleteWorkers" "DeleteCluster" "DeleteSelf" -}}
{{- if has $policy $order -}}
{{- range $later := slice $order (add1 (int (index (dict "DeleteWorkers" 0 "DeleteCluster" 1 "DeleteSelf" 2) $policy))) -}}
{{- $other := printf "%s/%s" $status $later -}}
{{- if and (hasKey $ttls $other) (lt (int (get $ttls $other)) $ttl) -}}
{{- fail (printf "job.deletionStrategy.deletionRules for %s delete with %s after %vs but %s after %vs, and KubeRay requires DeleteWorkers <= DeleteCluster <= DeleteSelf: raise the %s ttlSeconds" $status $later (get $ttls $other) $policy $ttl $later) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The command the RayJob runs on the head (or that NOTES show for `ray job submit`).
*/}}
{{- define "n2n.entrypoint" -}}
{{- $runDir := include "n2n.runDir" . -}}
{{- $args := list "n2n" .Values.job.command -}}
{{- if .Values.job.resume -}}
{{- $args = concat $args (list "--resume" $runDir "--address" "auto" "--tracking-uri" (include "n2n.trackingUri" .)) -}}
{{- else -}}
{{- if .Values.job.config -}}
{{- $args = concat $args (list "--preset" "/etc/n2n/config.yaml") -}}
{{- else -}}
{{- $args = concat $args (list "--preset" .Values.job.preset) -}}
{{- end -}}
{{- $args = concat $args (list "--address" "auto") -}}
{{- $sets := list -}}
{{- if eq .Values.job.command "teacher" -}}
{{- /* `n2n teacher` has no --tracking-uri flag (the config key does the same) and writes its checkpoint to --out. */ -}}
{{- $sets = append $sets (printf "tracking.uri=%s" (include "n2n.trackingUri" .)) -}}
{{- with $runDir -}}
{{- $args = concat $args (list "--out" .) -}}
{{- end -}}
{{- else -}}
{{- $args = concat $args (list "--tracking-uri" (include "n2n.trackingUri" .)) -}}
{{- with $runDir -}}
{{- $args = concat $args (list "--run-dir" .) -}}
{{- end -}}
{{- $storage := .Values.output.storagePath | default (ternary (printf "%s/tune" $runDir) "" (ne $runDir "")) -}}
{{- with $storage -}}
{{- $args = concat $args (list "--storage-path" .) -}}
{{- end -}}
{{- end -}}
{{- with .Values.tracking.experiment -}}
{{- $sets = append $sets (printf "tracking.experiment=%s" .) -}}
{{- end -}}
{{- if not (kindIs "invalid" .Values.ray.cpusPerChild) -}}
{{- $sets = append $sets (printf "ray.cpus_per_child=%v" .Values.ray.cpusPerChild) -}}
{{- end -}}
{{- if not (kindIs "invalid" .Values.ray.gpusPerChild) -}}
{{- $sets = append $sets (printf "ray.gpus_per_child=%v" .Values.ray.gpusPerChild) -}}
{{- end -}}
{{- range concat $sets .Values.job.overrides -}}
{{- $args = concat $args (list "--set" .) -}}
{{- end -}}
{{- end -}}
{{- $quoted := list -}}
{{- range $args -}}
{{- $quoted = append $quoted (include "n2n.shellQuote" .) -}}
{{- end -}}
{{- join " " $quoted -}}
{{- end -}}

{{/*
Environment of every Ray container: tracking (and its login), telemetry off, S3 endpoint.
*/}}
{{- define "n2n.ray.env" -}}
- name: MLFLOW_TRACKING_URI
  value: {{ include "n2n.trackingUri" . | quote }}
{{- if include "n2n.mlflow.loginFromSecret" . }}
- name: MLFLOW_TRACKING_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ include "n2n.mlflow.authSecretName" . }}
      key: admin-username
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "n2n.mlflow.authSecretName" . }}
      key: admin-password
{{- end }}
- name: MLFLOW_DISABLE_TELEMETRY
  value: "true"
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- with include "n2n.s3.env" . }}
{{ trim . }}
{{- end }}
{{- end -}}

{{- define "n2n.s3.env" -}}
{{- with .Values.s3.endpointUrl }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ . | quote }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- end -}}

{{/*
Secrets of the Ray containers, by reference only (envFrom): S3 keys and tracking credentials.
*/}}
{{- define "n2n.ray.envFrom" -}}
{{- with .Values.s3.existingSecret }}
- secretRef:
    name: {{ . }}
{{- end }}
{{- with .Values.tracking.existingSecret }}
- secretRef:
    name: {{ . }}
{{- end }}
{{- end -}}

{{- define "n2n.configMapName" -}}
{{- printf "%s-config" (include "n2n.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Volume mounts and volumes of every Ray container: Ray's session directory on an emptyDir (named
ray-logs, as KubeRay names the one it shares with the autoscaler sidecar, so both use this one),
the shared results volume, and on the head the inline config.
Called with (dict "root" $ "head" true/false).
*/}}
{{- define "n2n.ray.volumeMounts" -}}
- name: ray-logs
  mountPath: /tmp/ray
{{- if include "n2n.sharedVolume.claimName" .root }}
- name: shared
  mountPath: {{ .root.Values.sharedVolume.mountPath }}
{{- end }}
{{- if and .head .root.Values.job.config }}
- name: n2n-config
  mountPath: /etc/n2n
  readOnly: true
{{- end }}
{{- end -}}

{{- define "n2n.ray.volumes" -}}
- name: ray-logs
  emptyDir: {}
{{- with include "n2n.sharedVolume.claimName" .root }}
- name: shared
  persistentVolumeClaim:
    claimName: {{ . }}
{{- end }}
{{- if and .head .root.Values.job.config }}
- name: n2n-config
  configMap:
    name: {{ include "n2n.configMapName" .root }}
{{- end }}
{{- end -}}

{{/*
One worker group. Called with (dict "root" $ "group" <values of the group> "gpus" <GPUs per pod>).
*/}}
{{- define "n2n.workerGroup" -}}
{{- $root := .root -}}
{{- $w := .group -}}
{{- $gpus := int .gpus -}}
{{- $envFrom := include "n2n.ray.envFrom" $root -}}
- groupName: {{ $w.groupName }}
  replicas: {{ $w.replicas }}
  minReplicas: {{ $w.minReplicas }}
  maxReplicas: {{ $w.maxReplicas }}
  rayStartParams:
    {{- toYaml $w.rayStartParams | nindent 4 }}
  template:
    metadata:
      labels:
        {{- include "n2n.labels" $root | nindent 8 }}
        app.kubernetes.io/component: ray-worker
    spec:
      # Workers never call the Kubernetes API.
      automountServiceAccountToken: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      containers:
        - name: ray-worker
          image: {{ include "n2n.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          env:
            {{- include "n2n.ray.env" $root | nindent 12 }}
          {{- with $envFrom }}
          envFrom:
            {{- trim . | nindent 12 }}
          {{- end }}
          {{- $resources := deepCopy $w.resources }}
          {{- if gt $gpus 0 }}
          {{- $limits := default (dict) $resources.limits }}
          {{- $_ := set $limits "nvidia.com/gpu" $gpus }}
          {{- $_ := set $resources "limits" $limits }}
          {{- end }}
          resources:
            {{- toYaml $resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            {{- include "n2n.ray.volumeMounts" (dict "root" $root "head" false) | nindent 12 }}
      volumes:
        {{- include "n2n.ray.volumes" (dict "root" $root "head" false) | nindent 8 }}
      {{- with $w.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- $tolerations := $w.tolerations }}
      {{- if gt $gpus 0 }}
      {{- $tolerations = append $tolerations (dict "key" "nvidia.com/gpu" "operator" "Exists" "effect" "NoSchedule") }}
      {{- end }}
      {{- with $tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $w.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end -}}

{{/*
The RayCluster spec shared by the RayJob (rayClusterSpec) and the standalone RayCluster: a head
that runs the search (driver, trial, env runners) and no child (num-cpus 0), the children's
autoscaling worker group (GPUs when ray.workers.gpus > 0) and a CPU worker group for CPU-only
children.
*/}}
{{- define "n2n.rayClusterSpec" -}}
{{- $envFrom := include "n2n.ray.envFrom" . -}}
rayVersion: {{ .Values.ray.version | quote }}
authOptions:
  mode: {{ .Values.ray.auth.mode }}
  {{- with .Values.ray.auth.existingSecret }}
  secretName: {{ . }}
  {{- end }}
enableInTreeAutoscaling: {{ .Values.ray.autoscaling.enabled }}
{{- if .Values.ray.autoscaling.enabled }}
autoscalerOptions:
  idleTimeoutSeconds: {{ .Values.ray.autoscaling.idleTimeoutSeconds }}
  upscalingMode: Default
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  resources:
    {{- toYaml .Values.ray.autoscaling.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
{{- end }}
headGroupSpec:
  serviceType: ClusterIP
  rayStartParams:
    {{- toYaml .Values.ray.head.rayStartParams | nindent 4 }}
  template:
    metadata:
      labels:
        {{- include "n2n.labels" . | nindent 8 }}
        app.kubernetes.io/component: ray-head
    spec:
      # The autoscaler sidecar talks to the Kubernetes API with the service account KubeRay
      # makes for it; without autoscaling nothing on the head needs a token.
      automountServiceAccountToken: {{ .Values.ray.autoscaling.enabled }}
      {{- with .Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml .Values.podSecurityContext | nindent 8 }}
      containers:
        - name: ray-head
          image: {{ include "n2n.image" . }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          ports:
            - containerPort: 6379
              name: gcs-server
            - containerPort: 8265
              name: dashboard
            - containerPort: 10001
              name: client
          env:
            {{- include "n2n.ray.env" . | nindent 12 }}
          {{- with $envFrom }}
          envFrom:
            {{- trim . | nindent 12 }}
          {{- end }}
          resources:
            {{- toYaml .Values.ray.head.resources | nindent 12 }}
          securityContext:
            {{- toYaml .Values.securityContext | nindent 12 }}
          volumeMounts:
            {{- include "n2n.ray.volumeMounts" (dict "root" . "head" true) | nindent 12 }}
      volumes:
        {{- include "n2n.ray.volumes" (dict "root" . "head" true) | nindent 8 }}
      {{- with .Values.ray.head.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.ray.head.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.ray.head.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
workerGroupSpecs:
  {{- include "n2n.workerGroup" (dict "root" . "group" .Values.ray.workers "gpus" .Values.ray.workers.gpus) | nindent 2 }}
  {{- if .Values.ray.cpuWorkers.enabled }}
  {{- include "n2n.workerGroup" (dict "root" . "group" .Values.ray.cpuWorkers "gpus" 0) | nindent 2 }}
  {{- end }}
{{- end -}}
