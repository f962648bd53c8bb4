{{/* The release's full name, at most 63 characters. */}}
{{- define "terrapeak.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "terrapeak.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "terrapeak.labels" -}}
{{ include "terrapeak.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The Secret holding the environment secrets: the user's, or the chart's own. */}}
{{- define "terrapeak.secretName" -}}
{{- default (include "terrapeak.fullname" .) .Values.existingSecret -}}
{{- end -}}

{{/* terrapeak.yml: the user's configuration with what the chart decides. */}}
{{- define "terrapeak.config" -}}
{{- $fixed := dict
      "server" (dict "addr" (printf ":%d" (int .Values.service.port)))
      "storage" (dict "file" (dict "path" "/data"))
      "metrics" (dict "addr" (printf ":%d" (int .Values.metrics.port))) -}}
{{- toYaml (mergeOverwrite (deepCopy .Values.config) $fixed) -}}
{{- end -}}
