{{/* Names and labels shared by every object. */}}
{{- define "strata.name" -}}strata{{- end -}}
{{- define "strata.driver" -}}strata.csi.dev{{- end -}}
{{- define "strata.fullname" -}}{{ .Release.Name | trunc 40 | trimSuffix "-" }}{{- end -}}

{{- define "strata.labels" -}}
app.kubernetes.io/name: strata
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "strata.selector" -}}
app.kubernetes.io/name: strata
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "strata.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The store URL both components use. */}}
{{- define "strata.storeUrl" -}}
{{- $q := list -}}
{{- with .Values.store.endpoint }}{{ $q = append $q (printf "endpoint=%s" .) }}{{ end -}}
{{- with .Values.store.region }}{{ $q = append $q (printf "region=%s" .) }}{{ end -}}
{{- if .Values.store.pathStyle }}{{ $q = append $q "path_style=true" }}{{ end -}}
s3://{{ .Values.store.bucket }}/{{ .Values.store.prefix }}{{ if $q }}?{{ join "&" $q }}{{ end }}
{{- end -}}

{{- define "strata.storeSecret" -}}
{{- if .Values.store.credentials.existingSecret -}}
{{ .Values.store.credentials.existingSecret }}
{{- else if .Values.store.credentials.accessKeyId -}}
{{ include "strata.fullname" . }}-store
{{- end -}}
{{- end -}}

{{- define "strata.agentSecret" -}}
{{ .Values.agent.existingSecret | default (printf "%s-agent-token" (include "strata.fullname" .)) }}
{{- end -}}

{{- define "strata.agentTlsSecret" -}}
{{ (dig "tls" "existingSecret" "" .Values.agent) | default (printf "%s-agent-tls" (include "strata.fullname" .)) }}
{{- end -}}

{{/* How the node plugin and the controller carry the agent API: TLS files, or plaintext. */}}
{{- define "strata.agentTlsEnv" -}}
{{- if (dig "tls" "enabled" true .Values.agent) -}}
- name: STRATA_AGENT_TLS_CERT
  value: /etc/strata/agent-tls/tls.crt
- name: STRATA_AGENT_TLS_KEY
  value: /etc/strata/agent-tls/tls.key
- name: STRATA_AGENT_TLS_CA
  value: /etc/strata/agent-tls/ca.crt
{{- else -}}
- name: STRATA_AGENT_INSECURE
  value: "true"
{{- end -}}
{{- end -}}

{{- define "strata.agentTlsMount" -}}
{{- if (dig "tls" "enabled" true .Values.agent) -}}
- {name: agent-tls, mountPath: /etc/strata/agent-tls, readOnly: true}
{{- end -}}
{{- end -}}

{{- define "strata.agentTlsVolume" -}}
{{- if (dig "tls" "enabled" true .Values.agent) -}}
- name: agent-tls
  secret:
    secretName: {{ include "strata.agentTlsSecret" . }}
    items: [{key: ca.crt, path: ca.crt}, {key: tls.crt, path: tls.crt}, {key: tls.key, path: tls.key}]
{{- end -}}
{{- end -}}

{{/* Environment every Strata container gets. */}}
{{- define "strata.commonEnv" -}}
- name: STRATA_STORE
  value: {{ include "strata.storeUrl" . | quote }}
- name: STRATA_AGENT_TOKEN_FILE
  value: /etc/strata/agent/token
- name: STRATA_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
- name: STRATA_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
{{- with (include "strata.storeSecret" .) }}
- name: AWS_ACCESS_KEY_ID
  valueFrom: {secretKeyRef: {name: {{ . }}, key: AWS_ACCESS_KEY_ID}}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom: {secretKeyRef: {name: {{ . }}, key: AWS_SECRET_ACCESS_KEY}}
{{- end }}
{{- end -}}

{{/* A number as an integer: YAML numbers reach templates as floats (4194304 would otherwise
render as 4.194304e+06). */}}
{{- define "strata.int" -}}{{ printf "%d" (int64 .) }}{{- end -}}
