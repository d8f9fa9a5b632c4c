{{/* Chart name, truncated to the 63-character label limit. */}}
{{- define "kvroute.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name prefix of every resource. Worker names append "-w-<group>" (<= 52+). */}}
{{- define "kvroute.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kvroute.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels shared by everything in the release: name + instance. Every
selector includes app.kubernetes.io/instance, so one release never selects another
release's pods. */}}
{{- define "kvroute.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvroute.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kvroute.labels" -}}
helm.sh/chart: {{ include "kvroute.chart" . }}
{{ include "kvroute.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kvroute
{{- end }}

{{/* ---- router ---- */}}
{{- define "kvroute.router.fullname" -}}
{{- printf "%s-router" (include "kvroute.fullname" .) }}
{{- end }}

{{- define "kvroute.router.selectorLabels" -}}
{{ include "kvroute.selectorLabels" . }}
app.kubernetes.io/component: router
{{- end }}

{{- define "kvroute.router.labels" -}}
{{ include "kvroute.labels" . }}
app.kubernetes.io/component: router
{{- end }}

{{- define "kvroute.router.serviceAccountName" -}}
{{- if .Values.router.serviceAccount.create }}
{{- default (include "kvroute.router.fullname" .) .Values.router.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.router.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kvroute.router.image" -}}
{{- $img := .Values.router.image }}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) }}
{{- end }}

{{/* Label selector the router's k8s discovery watches: this release's workers only. */}}
{{- define "kvroute.workerSelector" -}}
{{- printf "app.kubernetes.io/name=%s,app.kubernetes.io/instance=%s,app.kubernetes.io/component=worker" (include "kvroute.name" .) .Release.Name }}
{{- end }}

{{/* ---- workers ----
Called with (dict "root" $ "w" <workers[] entry>). */}}
{{- define "kvroute.worker.fullname" -}}
{{- printf "%s-w-%s" (include "kvroute.fullname" .root) .w.name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kvroute.worker.selectorLabels" -}}
{{ include "kvroute.selectorLabels" .root }}
app.kubernetes.io/component: worker
kvroute.io/worker-group: {{ .w.name }}
{{- end }}

{{- define "kvroute.worker.labels" -}}
{{ include "kvroute.labels" .root }}
app.kubernetes.io/component: worker
kvroute.io/worker-group: {{ .w.name }}
kvroute.io/model: {{ .w.model }}
kvroute.io/tier: {{ default "default" .w.tier }}
{{- end }}

{{/* Worker pod template labels: no chart or app version, so upgrading the chart or
the router never restarts GPU pods (and reloads models) unless the pod spec changes. */}}
{{- define "kvroute.worker.podLabels" -}}
{{ include "kvroute.worker.selectorLabels" . }}
app.kubernetes.io/part-of: kvroute
kvroute.io/model: {{ .w.model }}
kvroute.io/tier: {{ default "default" .w.tier }}
{{- end }}

{{/* In-cluster DNS name:port of a worker group's headless Service (dns discovery). */}}
{{- define "kvroute.worker.dnsTarget" -}}
{{- printf "%s.%s.svc.cluster.local:%d" (include "kvroute.worker.fullname" .) .root.Release.Namespace (int .root.Values.router.discovery.port) }}
{{- end }}

{{/* ---- router config (config.yaml), built as a dict and rendered once ---- */}}
{{- define "kvroute.routerConfig" -}}
{{- $r := .Values.router }}
{{- $server := merge (dict "host" "0.0.0.0" "port" (int $r.containerPort)) (deepCopy (default dict $r.config.server)) }}
{{- $disc := dict "mode" $r.discovery.mode }}
{{- if eq $r.discovery.mode "k8s" }}
{{- $_ := set $disc "namespace" .Release.Namespace }}
{{- $_ := set $disc "label_selector" (include "kvroute.workerSelector" .) }}
{{- $_ := set $disc "model_label" "kvroute.io/model" }}
{{- $_ := set $disc "tier_label" "kvroute.io/tier" }}
{{- $_ := set $disc "port" (int $r.discovery.port) }}
{{- $_ := set $disc "resync_s" $r.discovery.resyncSeconds }}
{{- else if eq $r.discovery.mode "dns" }}
{{- $services := dict }}
{{- range .Values.workers }}
{{- if hasKey $services .model }}
{{- fail (printf "router.discovery.mode=dns supports one worker group per model; model %q has several (use mode k8s)" .model) }}
{{- end }}
{{- $_ := set $services .model (include "kvroute.worker.dnsTarget" (dict "root" $ "w" .)) }}
{{- end }}
{{- $_ := set $disc "services" $services }}
{{- $_ := set $disc "interval_s" $r.discovery.intervalSeconds }}
{{- end }}
{{- $models := list }}
{{- $seen := dict }}
{{- range $r.config.models }}
{{- $_ := set $seen .name true }}
{{- $models = append $models (deepCopy .) }}
{{- end }}
{{- range .Values.workers }}
{{- if not (hasKey $seen .model) }}
{{- $_ := set $seen .model true }}
{{- $models = append $models (dict "name" .model) }}
{{- end }}
{{- end }}
{{- if not $models }}
{{- fail "no models: set workers[] or router.config.models" }}
{{- end }}
{{- if eq $r.discovery.mode "static" }}
{{- range $models }}
{{- if not .workers }}
{{- fail (printf "router.discovery.mode=static: router.config.models entry %q needs workers: [URL, ...]" .name) }}
{{- end }}
{{- end }}
{{- end }}
{{- $cfg := dict "server" $server "health" (default dict $r.config.health) "scrape" (default dict $r.config.scrape) "discovery" $disc "models" $models }}
{{- if hasKey $r.config "log_prompts" }}
{{- $_ := set $cfg "log_prompts" $r.config.log_prompts }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}
