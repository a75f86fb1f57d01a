{{/* The release's full name, at most 63 characters. */}}
{{- define "medmerge.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "medmerge.labels" -}}
app.kubernetes.io/name: medmerge-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "medmerge.selectorLabels" -}}
app.kubernetes.io/name: medmerge-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "medmerge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "medmerge.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}
