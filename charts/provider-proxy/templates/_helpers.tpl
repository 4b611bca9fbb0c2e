{{/*
The chart's name, or nameOverride.
*/}}
{{- define "provider-proxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name of the controller's objects. A release named like the chart (the usual
`helm install provider-proxy ...`) gives plain `provider-proxy`, the name sidecars use by
default: http://provider-proxy.<namespace>.svc:15443.
*/}}
{{- define "provider-proxy.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "provider-proxy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The namespace the controller runs in.
*/}}
{{- define "provider-proxy.namespace" -}}
{{- .Release.Namespace }}
{{- end }}

{{/*
Labels on every object the chart renders.
*/}}
{{- define "provider-proxy.labels" -}}
helm.sh/chart: {{ include "provider-proxy.chart" . }}
{{ include "provider-proxy.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/part-of: provider-proxy
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Labels that select the controller's pods (immutable once installed).
*/}}
{{- define "provider-proxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "provider-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end }}

{{/*
The controller's ServiceAccount.
*/}}
{{- define "provider-proxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "provider-proxy.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference from {repository, tag, digest}: a digest wins over a tag, and an empty tag
means the chart's appVersion. Call with (dict "image" .Values.image "context" $).
*/}}
{{- define "provider-proxy.imageRef" -}}
{{- $image := .image }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default .context.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/*
The controller's image.
*/}}
{{- define "provider-proxy.image" -}}
{{- include "provider-proxy.imageRef" (dict "image" .Values.image "context" .) }}
{{- end }}

{{/*
The sidecar's image: sidecar.image, each empty field taken from image.
*/}}
{{- define "provider-proxy.sidecarImage" -}}
{{- $image := dict
  "repository" (default .Values.image.repository .Values.sidecar.image.repository)
  "tag" (default .Values.image.tag .Values.sidecar.image.tag)
  "digest" (default .Values.image.digest .Values.sidecar.image.digest) }}
{{- include "provider-proxy.imageRef" (dict "image" $image "context" .) }}
{{- end }}

{{/*
The URL sidecars connect to for snapshots.
*/}}
{{- define "provider-proxy.controllerURL" -}}
{{- printf "%s://%s.%s.svc:%d" (ternary "https" "http" .Values.snapshotTLS.enabled) (include "provider-proxy.fullname" .) (include "provider-proxy.namespace" .) (int .Values.service.ports.snapshot) }}
{{- end }}

{{/*
Whether the ServiceMonitor / PodMonitor can be rendered: enabled, and the Prometheus Operator's
API is served by the cluster (or passed with `helm template --api-versions monitoring.coreos.com/v1`).
*/}}
{{- define "provider-proxy.serviceMonitor.enabled" -}}
{{- if and .Values.serviceMonitor.enabled (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") }}true{{ end }}
{{- end }}
{{- define "provider-proxy.podMonitor.enabled" -}}
{{- if and .Values.podMonitor.enabled (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") }}true{{ end }}
{{- end }}

{{/*
The sidecar as a pod-template fragment: the label that marks pods carrying it (the
NetworkPolicy and the PodMonitor select on it), the native sidecar (an init container with
restartPolicy: Always, so it starts before the app and stops after it), its projected
ServiceAccount token for the controller's audience, and the emptyDir that caches the last
snapshot across sidecar restarts. deploy/examples/30-app-with-sidecar.yaml is this fragment
in a Deployment; the injection webhook to come will add the same.
*/}}
{{- define "provider-proxy.sidecar.podTemplate" -}}
metadata:
  labels:
    {{- toYaml .Values.sidecar.podLabels | nindent 4 }}
spec:
  initContainers:
    - name: provider-proxy
      image: {{ include "provider-proxy.sidecarImage" . }}
      imagePullPolicy: {{ .Values.sidecar.image.pullPolicy }}
      restartPolicy: Always
      args:
        - sidecar
        - --controller={{ include "provider-proxy.controllerURL" . }}
        - --token-file=/var/run/secrets/provider-proxy/token
        - --snapshot-cache=/var/cache/provider-proxy/snapshot.json
        - --listen=127.0.0.1:{{ .Values.sidecar.ports.listen }}
        - --admin=0.0.0.0:{{ .Values.sidecar.ports.admin }}
      env:
        - name: LOG_FORMAT
          value: {{ .Values.sidecar.logging.format | quote }}
        - name: RUST_LOG
          value: {{ .Values.sidecar.logging.level | quote }}
        - name: LOG_QUEUE_LINES
          value: {{ .Values.sidecar.logging.queueLines | quote }}
        - name: WORKER_THREADS
          value: {{ .Values.sidecar.workerThreads | quote }}
      ports:
        - name: pp-admin
          containerPort: {{ .Values.sidecar.ports.admin }}
          protocol: TCP
      startupProbe:
        httpGet:
          path: /readyz
          port: pp-admin
        periodSeconds: 1
        failureThreshold: 120
      livenessProbe:
        httpGet:
          path: /healthz
          port: pp-admin
        periodSeconds: 10
        failureThreshold: 3
      readinessProbe:
        httpGet:
          path: /readyz
          port: pp-admin
        periodSeconds: 5
        failureThreshold: 3
      {{- with .Values.sidecar.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml .Values.sidecar.securityContext | nindent 8 }}
      volumeMounts:
        - name: provider-proxy-token
          mountPath: /var/run/secrets/provider-proxy
          readOnly: true
        - name: provider-proxy-cache
          mountPath: /var/cache/provider-proxy
  volumes:
    - name: provider-proxy-token
      projected:
        sources:
          - serviceAccountToken:
              audience: {{ .Values.tokenAudience }}
              expirationSeconds: {{ .Values.sidecar.tokenExpirationSeconds }}
              path: token
    - name: provider-proxy-cache
      emptyDir:
        sizeLimit: {{ .Values.sidecar.cacheSizeLimit }}
{{- end }}
