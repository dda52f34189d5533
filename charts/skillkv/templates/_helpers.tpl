{{/*
Shared template helpers: names, labels, images, ServiceAccount names.
*/}}

{{/* Chart name, overridable with nameOverride. */}}
{{- define "skillkv.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name prefix of every resource. Truncated to 50 characters so that suffixes such as
"-controller" keep names within the 63-character DNS label limit.
*/}}
{{- define "skillkv.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "skillkv.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels selecting one component's pods: pass (dict "ctx" $ "component" "router"). */}}
{{- define "skillkv.selectorLabels" -}}
app.kubernetes.io/name: {{ include "skillkv.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Standard labels of every object: pass (dict "ctx" $ "component" "router"). */}}
{{- define "skillkv.labels" -}}
helm.sh/chart: {{ include "skillkv.chart" .ctx }}
{{ include "skillkv.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: skillkv
{{- end }}

{{/* The one tag both images use. */}}
{{- define "skillkv.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{/* Image reference of one repository: pass (dict "ctx" $ "repository" "..."). */}}
{{- define "skillkv.image" -}}
{{- $registry := trimSuffix "/" .ctx.Values.image.registry }}
{{- if $registry }}
{{- printf "%s/%s:%s" $registry .repository (include "skillkv.imageTag" .ctx) }}
{{- else }}
{{- printf "%s:%s" .repository (include "skillkv.imageTag" .ctx) }}
{{- end }}
{{- end }}

{{- define "skillkv.operatorImage" -}}
{{- include "skillkv.image" (dict "ctx" . "repository" .Values.image.operatorRepository) }}
{{- end }}

{{- define "skillkv.daemonImage" -}}
{{- include "skillkv.image" (dict "ctx" . "repository" .Values.image.daemonRepository) }}
{{- end }}

{{/* ServiceAccount name of one component: pass (dict "ctx" $ "component" "router"). */}}
{{- define "skillkv.serviceAccountName" -}}
{{- $base := default (include "skillkv.fullname" .ctx) .ctx.Values.serviceAccount.name }}
{{- printf "%s-%s" $base .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Name of a cluster-scoped object of one component. Cluster-scoped names must be unique in the
whole cluster, so they carry the release namespace: pass (dict "ctx" $ "component" "router").
*/}}
{{- define "skillkv.clusterName" -}}
{{- printf "%s-%s-%s" .ctx.Release.Namespace (include "skillkv.fullname" .ctx) .component }}
{{- end }}

{{/* Name of the controller's leader-election Lease. */}}
{{- define "skillkv.leaseName" -}}
{{- printf "%s-controller" (include "skillkv.fullname" .) }}
{{- end }}

{{/* Environment shared by both components: log format and api-key selector. */}}
{{- define "skillkv.commonEnv" -}}
- name: SKILLKV_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
- name: SKILLKV_API_KEY_SELECTOR
  value: {{ .Values.apiKeys.secretSelector | quote }}
- name: SKILLKV_METRICS_ADDR
  value: "0.0.0.0:9090"
- name: SKILLKV_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: SKILLKV_POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- end }}

{{/* Probes on the health port, shared by both components. */}}
{{- define "skillkv.probes" -}}
livenessProbe:
  httpGet:
    path: /healthz
    port: health
  periodSeconds: 10
  timeoutSeconds: 2
  failureThreshold: 3
readinessProbe:
  httpGet:
    path: /readyz
    port: health
  periodSeconds: 5
  timeoutSeconds: 2
  failureThreshold: 3
startupProbe:
  httpGet:
    path: /healthz
    port: health
  periodSeconds: 2
  failureThreshold: 30
{{- end }}

{{/* Pod scheduling and security shared by both components. */}}
{{- define "skillkv.podCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  - name: tmp
    emptyDir:
      sizeLimit: 64Mi
{{- end }}

{{/* Names of the image pull Secrets, comma-separated, for the daemon pods. */}}
{{- define "skillkv.pullSecretNames" -}}
{{- $names := list }}
{{- range .Values.imagePullSecrets }}
{{- $names = append $names .name }}
{{- end }}
{{- join "," $names }}
{{- end }}
