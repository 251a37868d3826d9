{{/* The control plane's name; its Service is reached as NAME.NAMESPACE.svc. */}}
{{- define "trustmesh.name" -}}trustmesh{{- end -}}

{{- define "trustmesh.labels" -}}
app.kubernetes.io/name: trustmesh
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "trustmesh.selectorLabels" -}}
app.kubernetes.io/name: trustmesh
app.kubernetes.io/component: control-plane
{{- end -}}

{{- define "trustmesh.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The webhook configuration's name, which the control plane patches. */}}
{{- define "trustmesh.webhookName" -}}trustmesh-sidecar-injector-{{ .Release.Namespace }}{{- end -}}

{{/* The validating webhook configuration's name, which the control plane
patches (caBundle, failurePolicy). */}}
{{- define "trustmesh.validationWebhookName" -}}trustmesh-validator-{{ .Release.Namespace }}{{- end -}}

{{/* The webhook's name inside it, the release's own, so that the
apiserver's messages tell releases apart. */}}
{{- define "trustmesh.validationHookName" -}}validation.{{ .Release.Namespace }}.trustmesh.io{{- end -}}

{{/* "true" when the control plane is to switch the validating webhook to
failurePolicy Fail once it answers: validation.failurePolicy Fail, or auto
with more than one replica. A single replica keeps Ignore: its absence (a
drain, a rollout) would otherwise block every write of the kinds the
webhook checks, in every namespace. */}}
{{- define "trustmesh.validationFailClosed" -}}
{{- $p := .Values.validation.failurePolicy | default "auto" }}
{{- if eq $p "Fail" }}true
{{- else if eq $p "auto" }}{{ include "trustmesh.replicated" . }}
{{- else if ne $p "Ignore" }}{{ fail (printf "validation.failurePolicy %q: want auto, Fail or Ignore" $p) }}
{{- end }}
{{- end -}}

{{- define "trustmesh.address" -}}
{{ include "trustmesh.name" . }}.{{ .Release.Namespace }}.svc:15012
{{- end -}}

{{- define "trustmesh.controlPlaneID" -}}
spiffe://{{ .Values.trustDomain }}/ns/{{ .Release.Namespace }}/sa/{{ include "trustmesh.name" . }}
{{- end -}}

{{/* Namespaces never injected: the system's and trustmesh's own. */}}
{{- define "trustmesh.neverInjected" -}}
- kube-system
- kube-public
- kube-node-lease
- {{ .Release.Namespace }}
{{- end -}}

{{- define "trustmesh.replicated" -}}
{{- if gt (int .Values.replicaCount) 1 }}true{{ end -}}
{{- end -}}
