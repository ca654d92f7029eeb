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
Checks that values agree with each other (types and ranges are values.schema.json's job).
Rendered once by every template that needs it, so any of them fails with the same message.
*/}}
{{- define "n2n.validate" -}}
{{- if and (not .Values.tracking.uri) (not .Values.mlflow.enabled) -}}
{{- fail "tracking.uri is empty and mlflow.enabled is false: set tracking.uri to your MLflow server (http://host:port) or mlflow.enabled=true" -}}
{{- end -}}
{{- $gpusPerChild := .Values.ray.gpusPerChild | default 0 | float64 -}}
{{- if and (gt $gpusPerChild 0.0) (eq (int .Values.ray.workers.gpus) 0) -}}
{{- fail (printf "ray.gpusPerChild=%v asks for GPUs but ray.workers.gpus=0, so children would never be scheduled: set ray.workers.gpus to the GPUs of each worker pod (for example 1)" .Values.ray.gpusPerChild) -}}
{{- end -}}
{{- $w := .Values.ray.workers -}}
{{- if or (gt (int $w.minReplicas) (int $w.replicas)) (gt (int $w.replicas) (int $w.maxReplicas)) -}}
{{- fail (printf "ray.workers needs minReplicas <= replicas <= maxReplicas, got %v <= %v <= %v: fix the three values" $w.minReplicas $w.replicas $w.maxReplicas) -}}
{{- end -}}
{{- end -}}

{{/*
The command the RayJob runs on the head (or that README shows for `ray job submit`).
*/}}
{{- define "n2n.entrypoint" -}}
{{- $args := list "n2n" .Values.job.command -}}
{{- if .Values.job.config -}}
{{- $args = concat $args (list "--preset" "/etc/n2n/config.yaml") -}}
{{- else -}}
{{- $args = concat $args (list "--preset" .Values.job.preset) -}}
{{- end -}}
{{- $args = concat $args (list "--address" "auto") -}}
{{- $sets := list -}}
{{- /* `n2n teacher` has no --tracking-uri flag; the config key does the same. */ -}}
{{- if eq .Values.job.command "teacher" -}}
{{- $sets = append $sets (printf "tracking.uri=%s" (include "n2n.trackingUri" .)) -}}
{{- else -}}
{{- $args = concat $args (list "--tracking-uri" (include "n2n.trackingUri" .)) -}}
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
{{- with .Values.output.runDir -}}
{{- $sets = append $sets (printf "output.run_dir=%s" .) -}}
{{- end -}}
{{- with .Values.output.storagePath -}}
{{- $sets = append $sets (printf "output.storage_path=%s" .) -}}
{{- end -}}
{{- range concat $sets .Values.job.overrides -}}
{{- $args = concat $args (list "--set" .) -}}
{{- end -}}
{{- $quoted := list -}}
{{- range $args -}}
{{- $quoted = append $quoted (include "n2n.shellQuote" .) -}}
{{- end -}}
{{- join " " $quoted -}}
{{- end -}}

{{/*
Environment of every Ray container: tracking, telemetry off, S3 endpoint.
*/}}
{{- define "n2n.ray.env" -}}
- name: MLFLOW_TRACKING_URI
  value: {{ include "n2n.trackingUri" . | quote }}
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
The RayCluster spec shared by the RayJob (rayClusterSpec) and the standalone RayCluster:
a CPU head that runs the search driver and one autoscaling worker group for the children.
*/}}
{{- define "n2n.rayClusterSpec" -}}
{{- $envFrom := include "n2n.ray.envFrom" . -}}
{{- $gpus := int .Values.ray.workers.gpus -}}
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
          {{- if or .Values.job.config .Values.sharedVolume.existingClaim }}
          volumeMounts:
            {{- if .Values.job.config }}
            - name: n2n-config
              mountPath: /etc/n2n
              readOnly: true
            {{- end }}
            {{- if .Values.sharedVolume.existingClaim }}
            - name: shared
              mountPath: {{ .Values.sharedVolume.mountPath }}
            {{- end }}
          {{- end }}
      {{- if or .Values.job.config .Values.sharedVolume.existingClaim }}
      volumes:
        {{- if .Values.job.config }}
        - name: n2n-config
          configMap:
            name: {{ include "n2n.configMapName" . }}
        {{- end }}
        {{- with .Values.sharedVolume.existingClaim }}
        - name: shared
          persistentVolumeClaim:
            claimName: {{ . }}
        {{- end }}
      {{- end }}
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
  - groupName: {{ .Values.ray.workers.groupName }}
    replicas: {{ .Values.ray.workers.replicas }}
    minReplicas: {{ .Values.ray.workers.minReplicas }}
    maxReplicas: {{ .Values.ray.workers.maxReplicas }}
    rayStartParams:
      {{- toYaml .Values.ray.workers.rayStartParams | nindent 6 }}
    template:
      metadata:
        labels:
          {{- include "n2n.labels" . | nindent 10 }}
          app.kubernetes.io/component: ray-worker
      spec:
        {{- with .Values.imagePullSecrets }}
        imagePullSecrets:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        securityContext:
          {{- toYaml .Values.podSecurityContext | nindent 10 }}
        containers:
          - name: ray-worker
            image: {{ include "n2n.image" . }}
            imagePullPolicy: {{ .Values.image.pullPolicy }}
            env:
              {{- include "n2n.ray.env" . | nindent 14 }}
            {{- with $envFrom }}
            envFrom:
              {{- trim . | nindent 14 }}
            {{- end }}
            {{- $resources := deepCopy .Values.ray.workers.resources }}
            {{- if gt $gpus 0 }}
            {{- $limits := default (dict) $resources.limits }}
            {{- $_ := set $limits "nvidia.com/gpu" $gpus }}
            {{- $_ := set $resources "limits" $limits }}
            {{- end }}
            resources:
              {{- toYaml $resources | nindent 14 }}
            securityContext:
              {{- toYaml .Values.securityContext | nindent 14 }}
            {{- with .Values.sharedVolume.existingClaim }}
            volumeMounts:
              - name: shared
                mountPath: {{ $.Values.sharedVolume.mountPath }}
            {{- end }}
        {{- with .Values.sharedVolume.existingClaim }}
        volumes:
          - name: shared
            persistentVolumeClaim:
              claimName: {{ . }}
        {{- end }}
        {{- with .Values.ray.workers.nodeSelector }}
        nodeSelector:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- $tolerations := .Values.ray.workers.tolerations }}
        {{- if gt $gpus 0 }}
        {{- $tolerations = append $tolerations (dict "key" "nvidia.com/gpu" "operator" "Exists" "effect" "NoSchedule") }}
        {{- end }}
        {{- with $tolerations }}
        tolerations:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with .Values.ray.workers.affinity }}
        affinity:
          {{- toYaml . | nindent 10 }}
        {{- end }}
{{- end -}}
