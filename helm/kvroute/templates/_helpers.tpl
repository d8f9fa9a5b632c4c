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

{{/* ---- secrets ----
Secrets the router reads are files in one projected volume with the config:
/etc/kvroute/secrets/<Secret name>/<key>. */}}
{{- define "kvroute.secretsDir" -}}
/etc/kvroute/secrets
{{- end }}

{{- define "kvroute.router.secretName" -}}
{{- printf "%s-secrets" (include "kvroute.router.fullname" .) }}
{{- end }}

{{- define "kvroute.workerApiKeySecret" -}}
{{- printf "%s-worker-api-key" (include "kvroute.fullname" .) }}
{{- end }}

{{/* A worker group's API key as JSON {name, key}, or "" when it has none.
Called with (dict "root" $ "w" <workers[] entry>). */}}
{{- define "kvroute.worker.apiKeyRef" -}}
{{- $a := default dict .w.apiKey }}
{{- if $a.existingSecret }}
{{- dict "name" $a.existingSecret "key" (default "api-key" $a.key) | toJson }}
{{- else if $a.create }}
{{- dict "name" (include "kvroute.workerApiKeySecret" .root) "key" (default "api-key" $a.key) | toJson }}
{{- end }}
{{- end }}

{{/* The base64 value of a chart-made random secret: the one already in the cluster, so
upgrades keep it (lookup sees nothing under `helm template`, which then makes a new one).
Called with (dict "root" $ "name" <Secret> "key" <key>). */}}
{{- define "kvroute.stableRandom" -}}
{{- $live := lookup "v1" "Secret" .root.Release.Namespace .name | default dict }}
{{- $data := get $live "data" | default dict }}
{{- if hasKey $data .key }}
{{- index $data .key }}
{{- else }}
{{- randAlphaNum 40 | b64enc }}
{{- end }}
{{- end }}

{{/* Resolve one config value that may hold a secret. {secretKeyRef: {name, key}} becomes
{file: <secretsDir>/<name>/<key>} (or the bare path with "path" true, for keys_file) and
the key is recorded in .mounts (Secret name -> key -> true) for the router's volume;
{file: ...}, {env: ...} and plain strings pass through. The result is left in .out.value.
Called with (dict "root" $ "value" V "where" KEY "mounts" M "out" O ["path" true]). */}}
{{- define "kvroute.resolveSecret" -}}
{{- $v := .value }}
{{- $_ := set .out "value" $v }}
{{- if and (kindIs "map" $v) (hasKey $v "secretKeyRef") }}
{{- $ref := $v.secretKeyRef }}
{{- $name := $ref.name }}
{{- if not $name }}
{{- $own := .root.Values.router.secrets }}
{{- if not $own.create }}
{{- fail (printf "router.config.%s: secretKeyRef without a name refers to the chart-made Secret; set router.secrets.create=true (or name a Secret)" .where) }}
{{- end }}
{{- if not (hasKey (default dict $own.stringData) $ref.key) }}
{{- fail (printf "router.config.%s: router.secrets.stringData has no key %q" .where $ref.key) }}
{{- end }}
{{- $name = include "kvroute.router.secretName" .root }}
{{- end }}
{{- $keys := get .mounts $name | default dict }}
{{- $_ := set $keys $ref.key true }}
{{- $_ := set .mounts $name $keys }}
{{- $file := printf "%s/%s/%s" (include "kvroute.secretsDir" .root) $name $ref.key }}
{{- if .path }}
{{- $_ := set .out "value" $file }}
{{- else }}
{{- $_ := set .out "value" (dict "file" $file) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Wire one worker pool (a plain model, or one tier of a tiered model) to the worker
groups that serve it: model label = model, and tier label = tier for a tier. Sets
upstream_model (what the pods serve), api_key (the groups' apiKey) and the kv_events
port/topic (the groups' kvEvents), and resolves api_key. .pool is changed in place.
Called with (dict "root" $ "pool" P "model" NAME "tier" TIER-or-"" "where" KEY "mounts" M);
a LoRA adapter on those groups adds "served" ADAPTER, the name its pods serve it by. */}}
{{- define "kvroute.wirePool" -}}
{{- $groups := list }}
{{- range .root.Values.workers }}
{{- if and (eq .model $.model) (or (not $.tier) (eq (default "default" .tier) $.tier)) }}
{{- $groups = append $groups . }}
{{- end }}
{{- end }}
{{- $source := .root.Values.router.discovery.source }}
{{- if and (ne $source "static") (not $groups) }}
{{- fail (printf "router.config.%s: no workers[] group serves it (model %q%s); discovery %s only finds this release's worker groups" .where .model (ternary (printf ", tier %q" .tier) "" (ne .tier "")) $source) }}
{{- end }}
{{- if $groups }}
{{- $served := default .model .served }}
{{- if and (hasKey .pool "upstream_model") (ne .pool.upstream_model $served) }}
{{- fail (printf "router.config.%s.upstream_model: its worker groups serve --served-model-name %q; remove upstream_model" .where $served) }}
{{- end }}
{{- if or .tier .served }}
{{- /* A tier's default upstream name is the tier's own; the pods serve the model's. */}}
{{- $_ := set .pool "upstream_model" $served }}
{{- end }}
{{- $keyRef := "" }}
{{- range $groups }}
{{- $ref := include "kvroute.worker.apiKeyRef" (dict "root" $.root "w" .) }}
{{- if and $ref $keyRef (ne $ref $keyRef) }}
{{- fail (printf "router.config.%s: its worker groups use different apiKey Secrets; a pool sends one key" $.where) }}
{{- end }}
{{- $keyRef = $ref | default $keyRef }}
{{- end }}
{{- if $keyRef }}
{{- if hasKey .pool "api_key" }}
{{- fail (printf "router.config.%s.api_key: set from its worker groups' apiKey; remove it here" .where) }}
{{- end }}
{{- $_ := set .pool "api_key" (dict "secretKeyRef" ($keyRef | fromJson)) }}
{{- end }}
{{- /* the groups' chat template and default kwargs (one of each per pool): rendered by the
router as the pods render them, when it has the pool's tokenizer */}}
{{- $templates := dict }}
{{- range $groups }}
{{- $_ := set $templates (dict "t" (default "" .chatTemplate) "k" (default dict .chatTemplateKwargs) | toJson) true }}
{{- end }}
{{- if gt (len $templates) 1 }}
{{- fail (printf "router.config.%s: its worker groups have different chatTemplate or chatTemplateKwargs; a pool renders one way" .where) }}
{{- end }}
{{- $template := keys $templates | first | fromJson }}
{{- if and (or $template.t $template.k) (hasKey .pool "tokenizer") }}
{{- range $key := list "chat_template" "chat_template_kwargs" }}
{{- if hasKey $.pool $key }}
{{- fail (printf "router.config.%s.%s: set from its worker groups' chatTemplate and chatTemplateKwargs; remove it here" $.where $key) }}
{{- end }}
{{- end }}
{{- if $template.t }}
{{- $_ := set .pool "chat_template" $template.t }}
{{- end }}
{{- if $template.k }}
{{- $_ := set .pool "chat_template_kwargs" $template.k }}
{{- end }}
{{- end }}
{{- if hasKey .pool "kv_events" }}
{{- $kv := .pool.kv_events }}
{{- $ports := dict }}
{{- $topics := dict }}
{{- range $groups }}
{{- if not (dig "kvEvents" "enabled" true .) }}
{{- fail (printf "router.config.%s.kv_events: worker group %q has kvEvents.enabled=false" $.where .name) }}
{{- end }}
{{- $_ := set $ports (dig "kvEvents" "port" 5557 . | int | toString) true }}
{{- $_ := set $topics (dig "kvEvents" "topic" "kv" .) true }}
{{- end }}
{{- if hasKey $kv "port" }}
{{- if not (hasKey $ports ($kv.port | int | toString)) }}
{{- fail (printf "router.config.%s.kv_events.port: its worker groups publish on kvEvents port %s" .where (keys $ports | sortAlpha | join ", ")) }}
{{- end }}
{{- else if not (or (hasKey $kv "port_offset") (hasKey $kv "endpoints")) }}
{{- if gt (len $ports) 1 }}
{{- fail (printf "router.config.%s.kv_events: its worker groups publish on different kvEvents ports; set port_offset or endpoints" .where) }}
{{- end }}
{{- $_ := set $kv "port" (keys $ports | first | int) }}
{{- end }}
{{- if and (not (hasKey $kv "topic")) (eq (len $topics) 1) }}
{{- $_ := set $kv "topic" (keys $topics | first) }}
{{- end }}
{{- end }}
{{- end }}
{{- if hasKey .pool "api_key" }}
{{- $out := dict }}
{{- include "kvroute.resolveSecret" (dict "root" .root "value" .pool.api_key "where" (printf "%s.api_key" .where) "mounts" .mounts "out" $out) }}
{{- $_ := set .pool "api_key" $out.value }}
{{- end }}
{{- end }}

{{/* ---- router config (config.yaml) ----
Built once as a dict together with the Secret keys it references, as JSON:
{config: ..., mounts: {Secret: {key: true}}}. router.config passes through whole; the
chart sets server.host/port and discovery, wires models to worker groups and turns
secretKeyRef references into mounted files. */}}
{{- define "kvroute.routerState" -}}
{{- $r := .Values.router }}
{{- $mounts := dict }}
{{- $cfg := omit (deepCopy $r.config) "server" "models" "governance" }}
{{- $_ := set $cfg "server" (merge (dict "host" "0.0.0.0" "port" (int $r.containerPort)) (deepCopy (default dict $r.config.server))) }}
{{- $disc := dict "source" $r.discovery.source }}
{{- if eq $r.discovery.source "k8s" }}
{{- $_ := set $disc "namespace" .Release.Namespace }}
{{- $_ := set $disc "label_selector" (include "kvroute.workerSelector" .) }}
{{- $_ := set $disc "model_label" "kvroute.io/model" }}
{{- $_ := set $disc "tier_label" "kvroute.io/tier" }}
{{- $_ := set $disc "port" (int $r.discovery.port) }}
{{- $_ := set $disc "resync_s" $r.discovery.resyncSeconds }}
{{- else if eq $r.discovery.source "dns" }}
{{- $services := dict }}
{{- range .Values.workers }}
{{- if hasKey $services .model }}
{{- fail (printf "router.discovery.source=dns supports one worker group per model; model %q has several (use source k8s)" .model) }}
{{- end }}
{{- $_ := set $services .model (include "kvroute.worker.dnsTarget" (dict "root" $ "w" .)) }}
{{- end }}
{{- $_ := set $disc "services" $services }}
{{- $_ := set $disc "interval_s" $r.discovery.intervalSeconds }}
{{- end }}
{{- $_ := set $cfg "discovery" $disc }}

{{- /* models: the configured entries, then one plain entry per other worker model */}}
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
{{- /* a LoRA adapter of a worker group: its base model's entry, on the same pods */}}
{{- range $group := .Values.workers }}
{{- range $group.loraAdapters }}
{{- if not (hasKey $seen .name) }}
{{- $_ := set $seen .name true }}
{{- $base := dict "name" $group.model }}
{{- range $r.config.models }}
{{- if eq .name $group.model }}
{{- $base = deepCopy . }}
{{- end }}
{{- end }}
{{- if $base.tiers }}
{{- fail (printf "workers[%s].loraAdapters: model %q has tiers; add %q to router.config.models with lora: true and workers_from: %s/TIER" $group.name $group.model .name $group.model) }}
{{- end }}
{{- $entry := omit $base "workers" "upstream_model" }}
{{- $_ := set $entry "name" .name }}
{{- $_ := set $entry "lora" true }}
{{- $_ := set $entry "workers_from" $group.model }}
{{- $models = append $models $entry }}
{{- end }}
{{- end }}
{{- end }}
{{- if not $models }}
{{- fail "no models: set workers[] or router.config.models" }}
{{- end }}
{{- range $m := $models }}
{{- $where := printf "models[%s]" $m.name }}
{{- if $m.tiers }}
{{- if eq $r.discovery.source "dns" }}
{{- fail (printf "router.config.%s: a tiered model needs discovery k8s (pod tier labels) or static" $where) }}
{{- end }}
{{- $tierNames := dict }}
{{- range $t := $m.tiers }}
{{- $_ := set $tierNames $t.name true }}
{{- if and (eq $r.discovery.source "static") (not $t.workers) }}
{{- fail (printf "router.discovery.source=static: router.config.models entry %q tier %q needs workers: [URL, ...]" $m.name $t.name) }}
{{- end }}
{{- include "kvroute.wirePool" (dict "root" $ "pool" $t "model" $m.name "tier" $t.name "where" (printf "%s.tiers[%s]" $where $t.name) "mounts" $mounts) }}
{{- end }}
{{- range $.Values.workers }}
{{- if and (eq .model $m.name) (not (hasKey $tierNames (default "default" .tier))) }}
{{- fail (printf "workers[%s]: model %q has tiers %s; set tier to one of them" .name $m.name (keys $tierNames | sortAlpha | join ", ")) }}
{{- end }}
{{- end }}
{{- else if $m.workers_from }}
{{- /* on another pool's pods (a LoRA adapter): wired to that pool's worker groups */}}
{{- $parts := splitList "/" $m.workers_from }}
{{- $served := default $m.name $m.upstream_model }}
{{- include "kvroute.wirePool" (dict "root" $ "pool" $m "model" (first $parts) "tier" (ternary (last $parts) "" (gt (len $parts) 1)) "served" $served "where" $where "mounts" $mounts) }}
{{- else }}
{{- if and (eq $r.discovery.source "static") (not $m.workers) }}
{{- fail (printf "router.discovery.source=static: router.config.models entry %q needs workers: [URL, ...]" $m.name) }}
{{- end }}
{{- $tiers := dict }}
{{- range $.Values.workers }}
{{- if eq .model $m.name }}
{{- $_ := set $tiers (default "default" .tier) true }}
{{- end }}
{{- end }}
{{- if gt (len $tiers) 1 }}
{{- fail (printf "workers: model %q has worker groups in tiers %s; add a router.config.models entry with tiers: [...] (cheapest first)" $m.name (keys $tiers | sortAlpha | join ", ")) }}
{{- end }}
{{- include "kvroute.wirePool" (dict "root" $ "pool" $m "model" $m.name "tier" "" "where" $where "mounts" $mounts) }}
{{- end }}
{{- end }}
{{- $_ := set $cfg "models" $models }}

{{- /* governance: secret references, and the in-chart Redis */}}
{{- if hasKey $r.config "governance" }}
{{- $g := deepCopy (default dict $r.config.governance) }}
{{- $out := dict }}
{{- if $g.admin_keys }}
{{- $keys := list }}
{{- range $i, $k := $g.admin_keys }}
{{- include "kvroute.resolveSecret" (dict "root" $ "value" $k "where" (printf "governance.admin_keys[%d]" $i) "mounts" $mounts "out" $out) }}
{{- $keys = append $keys $out.value }}
{{- end }}
{{- $_ := set $g "admin_keys" $keys }}
{{- end }}
{{- range $i, $t := $g.tenants }}
{{- $keys := list }}
{{- range $j, $k := $t.keys }}
{{- include "kvroute.resolveSecret" (dict "root" $ "value" $k "where" (printf "governance.tenants[%d].keys[%d]" $i $j) "mounts" $mounts "out" $out) }}
{{- $keys = append $keys $out.value }}
{{- end }}
{{- $_ := set $t "keys" $keys }}
{{- end }}
{{- if hasKey $g "keys_file" }}
{{- include "kvroute.resolveSecret" (dict "root" $ "value" $g.keys_file "where" "governance.keys_file" "mounts" $mounts "out" $out "path" true) }}
{{- $_ := set $g "keys_file" $out.value }}
{{- end }}
{{- with $g.alerts }}
{{- if hasKey . "webhook_url" }}
{{- include "kvroute.resolveSecret" (dict "root" $ "value" .webhook_url "where" "governance.alerts.webhook_url" "mounts" $mounts "out" $out) }}
{{- $_ := set . "webhook_url" $out.value }}
{{- end }}
{{- range $i, $h := (.webhooks | default list) }}
{{- include "kvroute.resolveSecret" (dict "root" $ "value" $h.url "where" (printf "governance.alerts.webhooks[%d].url" $i) "mounts" $mounts "out" $out) }}
{{- $_ := set $h "url" $out.value }}
{{- end }}
{{- end }}
{{- if $.Values.redis.enabled }}
{{- $rd := $g.redis | default dict }}
{{- range list "url" "password" }}
{{- if hasKey $rd . }}
{{- fail (printf "router.config.governance.redis.%s: set by the chart when redis.enabled=true; remove it (or disable redis to use an external one)" .) }}
{{- end }}
{{- end }}
{{- $_ := set $rd "url" (printf "redis://%s.%s.svc.cluster.local:6379/0" (include "kvroute.redis.fullname" $) $.Release.Namespace) }}
{{- $_ := set $rd "password" (dict "secretKeyRef" (dict "name" (include "kvroute.redis.secretName" $) "key" $.Values.redis.auth.key)) }}
{{- $_ := set $g "redis" $rd }}
{{- end }}
{{- with $g.redis }}
{{- if not (hasKey . "url") }}
{{- fail "router.config.governance.redis: set url (a secret reference, or a URL without credentials) or redis.enabled=true" }}
{{- end }}
{{- include "kvroute.resolveSecret" (dict "root" $ "value" .url "where" "governance.redis.url" "mounts" $mounts "out" $out) }}
{{- $_ := set . "url" $out.value }}
{{- if hasKey . "password" }}
{{- include "kvroute.resolveSecret" (dict "root" $ "value" .password "where" "governance.redis.password" "mounts" $mounts "out" $out) }}
{{- $_ := set . "password" $out.value }}
{{- end }}
{{- end }}
{{- $_ := set $cfg "governance" $g }}
{{- else if .Values.redis.enabled }}
{{- fail "redis.enabled: the in-chart Redis holds governance state; set router.config.governance (governance: {} turns it on with defaults) or disable redis" }}
{{- end }}
{{- /* telemetry: the OTLP exporter's headers may be secret references (a collector token) */}}
{{- with (($cfg.telemetry | default dict).traces | default dict).headers }}
{{- $headers := dict }}
{{- range $name, $v := . }}
{{- $out := dict }}
{{- include "kvroute.resolveSecret" (dict "root" $ "value" $v "where" (printf "telemetry.traces.headers.%s" $name) "mounts" $mounts "out" $out) }}
{{- $_ := set $headers $name $out.value }}
{{- end }}
{{- $_ := set $cfg.telemetry.traces "headers" $headers }}
{{- end }}
{{- toJson (dict "config" $cfg "mounts" $mounts) }}
{{- end }}

{{- define "kvroute.routerConfig" -}}
{{- (include "kvroute.routerState" . | fromJson).config | toYaml }}
{{- end }}

{{/* ---- redis ---- */}}
{{- define "kvroute.redis.fullname" -}}
{{- printf "%s-redis" (include "kvroute.fullname" .) }}
{{- end }}

{{- define "kvroute.redis.secretName" -}}
{{- default (include "kvroute.redis.fullname" .) .Values.redis.auth.existingSecret }}
{{- end }}

{{- define "kvroute.redis.selectorLabels" -}}
{{ include "kvroute.selectorLabels" . }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "kvroute.redis.labels" -}}
{{ include "kvroute.labels" . }}
app.kubernetes.io/component: redis
{{- end }}

{{/* "https" when the router serves TLS (router.config.server.tls), else "http". */}}
{{- define "kvroute.router.scheme" -}}
{{- if dig "server" "tls" nil (.Values.router.config | default dict) }}https{{ else }}http{{ end }}
{{- end }}
