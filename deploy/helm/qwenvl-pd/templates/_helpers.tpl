{{/* Chart name, truncated to a DNS label. */}}
{{- define "qwenvl-pd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Release-scoped base name. Kept to 54 characters so that "<base>-<role>" (role names are at
most 8 characters with the dash) is still a valid Service name (a DNS label, <= 63).
*/}}
{{- define "qwenvl-pd.fullname" -}}
{{- $base := "" -}}
{{- if .Values.fullnameOverride -}}
{{- $base = .Values.fullnameOverride -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- $base = .Release.Name -}}
{{- else -}}
{{- $base = printf "%s-%s" .Release.Name $name -}}
{{- end -}}
{{- end -}}
{{- $base | trunc 54 | trimSuffix "-" -}}
{{- end -}}

{{/* Name of a role's objects. Call with (dict "root" $ "role" "prefill"). */}}
{{- define "qwenvl-pd.roleName" -}}
{{- printf "%s-%s" (include "qwenvl-pd.fullname" .root) .role -}}
{{- end -}}

{{/* Fully qualified DNS name of a role's Service. */}}
{{- define "qwenvl-pd.roleFqdn" -}}
{{- printf "%s.%s.svc.%s" (include "qwenvl-pd.roleName" .) .root.Release.Namespace .root.Values.clusterDomain -}}
{{- end -}}

{{- define "qwenvl-pd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select a role's pods. Call with (dict "root" $ "role" "prefill"). */}}
{{- define "qwenvl-pd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "qwenvl-pd.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .role }}
{{- end -}}

{{- define "qwenvl-pd.labels" -}}
helm.sh/chart: {{ include "qwenvl-pd.chart" .root }}
{{ include "qwenvl-pd.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: qwenvl-pd
{{- end -}}

{{/* Container image of a role: the role's override, else the top-level image. */}}
{{- define "qwenvl-pd.image" -}}
{{- $g := .root.Values.image -}}
{{- $r := (index .root.Values .role).image | default dict -}}
{{- printf "%s:%s" ($r.repository | default $g.repository) ($r.tag | default $g.tag) -}}
{{- end -}}

{{- define "qwenvl-pd.pullPolicy" -}}
{{- $r := (index .root.Values .role).image | default dict -}}
{{- $r.pullPolicy | default .root.Values.image.pullPolicy -}}
{{- end -}}

{{/* The engine roles this release runs, space-separated: prefill, decode, and encode when enabled. */}}
{{- define "qwenvl-pd.engineRoles" -}}
{{- ternary "prefill decode encode" "prefill decode" .Values.encode.enabled -}}
{{- end -}}

{{/*
The proxy's --discover-dns value: comma-separated ROLE=HOST:PORT entries, one per engine role,
HOST being the role's headless Service FQDN (its A/AAAA records are the ready pods).
*/}}
{{- define "qwenvl-pd.discoverDns" -}}
{{- $root := . -}}
{{- $entries := list -}}
{{- range $role := splitList " " (include "qwenvl-pd.engineRoles" .) -}}
{{- $entries = append $entries (printf "%s=%s:%d" $role (include "qwenvl-pd.roleFqdn" (dict "root" $root "role" $role)) (int (index $root.Values $role).port)) -}}
{{- end -}}
{{- join "," $entries -}}
{{- end -}}

{{/* Container args of a role (the image's ENTRYPOINT is `qwenvl-pd`). */}}
{{- define "qwenvl-pd.args" -}}
{{- $v := index .root.Values .role -}}
{{- $args := list .role "--port" (toString (int $v.port)) -}}
{{- if eq .role "proxy" -}}
{{- $args = concat $args (list "--discover-dns" (include "qwenvl-pd.discoverDns" .root) "--served-model-name" .root.Values.model.servedModelName) -}}
{{- else if eq .role "encode" -}}
{{- $args = concat $args (list "--model" .root.Values.model.path "--transfer-protocol" .root.Values.transfer.protocol "--device" $v.device "--embedding-cache-gib" (toString $v.embeddingCacheGiB)) -}}
{{- if $v.embeddingStore -}}
{{- $args = concat $args (list "--embedding-store" $v.embeddingStore) -}}
{{- end -}}
{{- else -}}
{{- $args = concat $args (list "--model" .root.Values.model.path "--transfer-protocol" .root.Values.transfer.protocol "--device" $v.device) -}}
{{- $tp := int ($v.tensorParallelSize | default 1) -}}
{{- if and $v.accelerator.resource (lt (int $v.accelerator.count) $tp) -}}
{{- fail (printf "%s: accelerator.count (%d) must be at least tensorParallelSize (%d): one device per rank" .role (int $v.accelerator.count) $tp) -}}
{{- end -}}
{{- $args = concat $args (list "--tensor-parallel-size" (toString $tp)) -}}
{{- if .root.Values.enableExpertParallel -}}
{{- $args = append $args "--enable-expert-parallel" -}}
{{- end -}}
{{- $enc := .root.Values.encode -}}
{{- if and (eq .role "prefill") $enc.enabled $enc.embeddingStore -}}
{{- $args = concat $args (list "--embedding-store" $enc.embeddingStore) -}}
{{- end -}}
{{- end -}}
{{- concat $args ($v.extraArgs | default list) | toYaml -}}
{{- end -}}
