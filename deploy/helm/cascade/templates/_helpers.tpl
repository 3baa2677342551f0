{{/*
Shared snippets. Names: {release}-cascade-{component}, at most 63 characters (the
component suffix is always kept whole).
*/}}

{{- define "cascade.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* {release}-cascade, or fullnameOverride; the release name alone when it already
contains the chart name. */}}
{{- define "cascade.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "cascade.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A component's resource name: (dict "root" $ "component" "asr" ["max" 52]). The full
name is cut so that "-component" always fits in max (63; 52 for a StatefulSet, whose pods'
controller-revision-hash label adds 11). */}}
{{- define "cascade.componentName" -}}
{{- $max := .max | default 63 -}}
{{- $keep := sub $max (add1 (len .component)) | int -}}
{{- printf "%s-%s" (include "cascade.fullname" .root | trunc $keep | trimSuffix "-") .component -}}
{{- end -}}

{{- define "cascade.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: (dict "root" $ "component" "asr"). */}}
{{- define "cascade.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cascade.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Every label of an object or a pod: (dict "root" $ "component" "asr"). */}}
{{- define "cascade.labels" -}}
{{ include "cascade.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: cascade
helm.sh/chart: {{ include "cascade.chart" .root }}
{{- end -}}

{{- define "cascade.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "cascade.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* An image reference: (dict "root" $ "image" .Values.x.image ["repository" override]).
global.imageRegistry is prepended; the tag defaults to the chart's appVersion; a digest
pins it. */}}
{{- define "cascade.image" -}}
{{- $repo := .repository | default .image.repository -}}
{{- with .root.Values.global.imageRegistry -}}
{{- $repo = printf "%s/%s" (trimSuffix "/" .) $repo -}}
{{- end -}}
{{- $ref := printf "%s:%s" $repo (.image.tag | default .root.Chart.AppVersion | toString) -}}
{{- if .image.digest -}}
{{- $ref = printf "%s@%s" $ref .image.digest -}}
{{- end -}}
{{- $ref -}}
{{- end -}}

{{- define "cascade.imagePullSecrets" -}}
{{- with .Values.global.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The in-cluster URL of a deployed stage's headless Service:
(dict "root" $ "component" "asr" "port" 8001 ["path" "/v1"]). */}}
{{- define "cascade.stageUrl" -}}
{{- printf "http://%s.%s.svc:%v%s" (include "cascade.componentName" (dict "root" .root "component" .component)) .root.Release.Namespace .port (.path | default "") -}}
{{- end -}}

{{- define "cascade.asrUrl" -}}
{{- if .Values.asr.enabled -}}
{{- include "cascade.stageUrl" (dict "root" . "component" "asr" "port" .Values.asr.port) -}}
{{- else -}}
{{- required "asr.external.url is required when asr.enabled is false" .Values.asr.external.url -}}
{{- end -}}
{{- end -}}

{{- define "cascade.ttsUrl" -}}
{{- if .Values.tts.enabled -}}
{{- include "cascade.stageUrl" (dict "root" . "component" "tts" "port" .Values.tts.port) -}}
{{- else -}}
{{- required "tts.external.url is required when tts.enabled is false" .Values.tts.external.url -}}
{{- end -}}
{{- end -}}

{{/* The LLM's OpenAI base URL (ends in /v1 for vLLM and the cascade stage alike). */}}
{{- define "cascade.llmUrl" -}}
{{- if eq .Values.llm.mode "external" -}}
{{- required "llm.external.url is required when llm.mode is external" .Values.llm.external.url -}}
{{- else -}}
{{- include "cascade.stageUrl" (dict "root" . "component" "llm" "port" .Values.llm.port "path" "/v1") -}}
{{- end -}}
{{- end -}}

{{- define "cascade.llmModel" -}}
{{- if eq .Values.llm.mode "vllm" -}}
{{- .Values.llm.vllm.servedModelName -}}
{{- else if eq .Values.llm.mode "cpu" -}}
{{- .Values.llm.cpu.servedModelName -}}
{{- else -}}
{{- .Values.llm.external.model -}}
{{- end -}}
{{- end -}}

{{/* Secrets: which Secret and key each credential is read from. */}}
{{- define "cascade.orchestratorSecretName" -}}
{{- include "cascade.componentName" (dict "root" . "component" "orchestrator") -}}
{{- end -}}

{{- define "cascade.redisSecretName" -}}
{{- include "cascade.componentName" (dict "root" . "component" "redis") -}}
{{- end -}}

{{/* The terminationGracePeriodSeconds for a drain of (dict "root" $ "drain" N). */}}
{{- define "cascade.gracePeriod" -}}
{{- $s := .root.Values.shutdown -}}
{{- add (int $s.preStopSleepSeconds) (int (ceil .drain)) (int $s.graceMarginSeconds) -}}
{{- end -}}

{{/* The preStop hook (container level): Kubernetes' sleep action from 1.30 (beta, on by
default; GA in 1.34), an exec of `sleep` before (every image here has coreutils or
busybox). Nothing when shutdown.preStopSleepSeconds is 0. */}}
{{- define "cascade.lifecycle" -}}
{{- $sleep := int .Values.shutdown.preStopSleepSeconds -}}
{{- if gt $sleep 0 }}
lifecycle:
  preStop:
    {{- if semverCompare ">=1.30-0" .Capabilities.KubeVersion.Version }}
    sleep:
      seconds: {{ $sleep }}
    {{- else }}
    exec:
      command: ["sleep", "{{ $sleep }}"]
    {{- end }}
{{- end }}
{{- end -}}

{{/* topologySpreadConstraints with this component's labelSelector and
matchLabelKeys [pod-template-hash] filled in where missing:
(dict "root" $ "component" "asr" "constraints" list ["deployment" true]). */}}
{{- define "cascade.topologySpread" -}}
{{- $out := list -}}
{{- range .constraints -}}
{{- $c := deepCopy . -}}
{{- if not (hasKey $c "labelSelector") -}}
{{- $_ := set $c "labelSelector" (dict "matchLabels" (include "cascade.selectorLabels" (dict "root" $.root "component" $.component) | fromYaml)) -}}
{{- end -}}
{{- if and $.deployment (not (hasKey $c "matchLabelKeys")) -}}
{{- $_ := set $c "matchLabelKeys" (list "pod-template-hash") -}}
{{- end -}}
{{- $out = append $out $c -}}
{{- end -}}
{{- with $out }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Scheduling fields shared by every pod: (dict "root" $ "v" <component values>
"component" name ["deployment" true]). */}}
{{- define "cascade.scheduling" -}}
{{- with .v.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if hasKey .v "topologySpreadConstraints" }}
{{- include "cascade.topologySpread" (dict "root" .root "component" .component "constraints" .v.topologySpreadConstraints "deployment" .deployment) }}
{{- end }}
{{- end -}}

{{/* Pod annotations: the component's own plus Prometheus scrape annotations:
(dict "root" $ "v" <component values> "port" N ["extra" dict]). */}}
{{- define "cascade.podAnnotations" -}}
{{- $a := merge (dict) (.extra | default dict) (.v.podAnnotations | default dict) -}}
{{- if .root.Values.metrics.podAnnotations -}}
{{- $_ := set $a "prometheus.io/scrape" "true" -}}
{{- $_ := set $a "prometheus.io/port" (toString .port) -}}
{{- $_ := set $a "prometheus.io/path" "/metrics" -}}
{{- end -}}
{{- with $a }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The pod's identity for tracing (POD_NAME, POD_NAMESPACE first: the OTEL variables
expand them). Nothing while tracing.otlpEndpoint is "": (dict "root" $ "service" name). */}}
{{- define "cascade.tracingEnv" -}}
{{- $t := .root.Values.tracing -}}
{{- if $t.otlpEndpoint }}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $t.otlpEndpoint | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ .service | quote }}
{{- $attrs := list "k8s.namespace.name=$(POD_NAMESPACE)" "k8s.pod.name=$(POD_NAME)" "service.instance.id=$(POD_NAME)" (printf "service.version=%s" .root.Chart.AppVersion) -}}
{{- range $k, $v := $t.resourceAttributes -}}
{{- $attrs = append $attrs (printf "%s=%v" $k $v) -}}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $attrs | quote }}
{{- with $t.sampler }}
- name: OTEL_TRACES_SAMPLER
  value: {{ . | quote }}
{{- end }}
{{- with $t.samplerArg }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* A settings map as environment variables PREFIX_KEY: (dict "prefix" "CASCADE_ASR_"
"settings" map). */}}
{{- define "cascade.settingsEnv" -}}
{{- range $k, $v := .settings }}
- name: {{ printf "%s%s" $.prefix $k }}
  value: {{ ternary ($v | toJson) ($v | toString) (or (kindIs "slice" $v) (kindIs "map" $v)) | quote }}
{{- end }}
{{- end -}}

{{/* Resources with the GPU request added: (dict "resources" map "gpu" name "count" N). */}}
{{- define "cascade.resources" -}}
{{- $r := deepCopy (.resources | default dict) -}}
{{- if and .gpu (gt (int .count) 0) -}}
{{- $limits := get $r "limits" | default dict -}}
{{- $requests := get $r "requests" | default dict -}}
{{- $_ := set $limits .gpu (int .count) -}}
{{- $_ := set $requests .gpu (int .count) -}}
{{- $_ := set $r "limits" $limits -}}
{{- $_ := set $r "requests" $requests -}}
{{- end -}}
{{- with $r }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The volumes every cascade container writes to (read-only root filesystem). */}}
{{- define "cascade.scratchVolumes" -}}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
{{- end -}}

{{- define "cascade.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/cascade
{{- end -}}

{{/* HTTP probes: (dict "probes" <values> "startup" path "readiness" path "liveness" path). */}}
{{- define "cascade.probes" -}}
{{- range $kind := list "startup" "readiness" "liveness" }}
{{ $kind }}Probe:
  httpGet:
    path: {{ get $ $kind }}
    port: http
  {{- toYaml (get $.probes $kind) | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The components this release runs, each with its values, port and kind, as a dict
name -> (dict "v" values "port" N "kind" "orchestrator"|"stage"|"vllm"). */}}
{{- define "cascade.components" -}}
{{- $c := dict "orchestrator" (dict "v" .Values.orchestrator "port" .Values.orchestrator.port "kind" "orchestrator") -}}
{{- if .Values.asr.enabled -}}
{{- $_ := set $c "asr" (dict "v" .Values.asr "port" .Values.asr.port "kind" "stage") -}}
{{- end -}}
{{- if .Values.tts.enabled -}}
{{- $_ := set $c "tts" (dict "v" .Values.tts "port" .Values.tts.port "kind" "stage") -}}
{{- end -}}
{{- if eq .Values.llm.mode "cpu" -}}
{{- $_ := set $c "llm" (dict "v" .Values.llm "port" .Values.llm.port "kind" "stage") -}}
{{- else if eq .Values.llm.mode "vllm" -}}
{{- $_ := set $c "llm" (dict "v" .Values.llm "port" .Values.llm.port "kind" "vllm") -}}
{{- end -}}
{{- toJson $c -}}
{{- end -}}

{{/* The bundled Redis' Service address (host:port). */}}
{{- define "cascade.redisAddress" -}}
{{- printf "%s.%s.svc:6379" (include "cascade.componentName" (dict "root" . "component" "redis")) .Release.Namespace -}}
{{- end -}}

{{/* CASCADE_REDIS_URL, always from a Secret: the chart's (bundled Redis: composed with its
password; external: redis.external.url) or redis.external.existingSecret. A bundled Redis
whose password is in an existing Secret gets its URL composed in the pod from that Secret
(REDIS_PASSWORD, expanded by the kubelet). */}}
{{- define "cascade.redisUrlEnv" -}}
{{- $r := .Values.redis -}}
{{- if and (eq $r.mode "bundled") $r.bundled.auth.existingSecret }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $r.bundled.auth.existingSecret }}
      key: {{ $r.bundled.auth.existingSecretKey }}
- name: CASCADE_REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s/0" (include "cascade.redisAddress" .) | quote }}
{{- else }}
- name: CASCADE_REDIS_URL
  valueFrom:
    secretKeyRef:
      {{- if eq $r.mode "bundled" }}
      name: {{ include "cascade.redisSecretName" . }}
      key: redis-url
      {{- else if $r.external.existingSecret }}
      name: {{ $r.external.existingSecret }}
      key: {{ $r.external.existingSecretKey }}
      {{- else }}
      name: {{ include "cascade.orchestratorSecretName" . }}
      key: redis-url
      {{- end }}
{{- end }}
{{- end -}}

{{/* A value kept across upgrades: the existing Secret's entry when the release already
has it (lookup; empty under `helm template`), else the given value, else a new random one:
(dict "root" $ "secret" name "key" k "value" v "generate" "sk-"|""|...). Returns base64. */}}
{{- define "cascade.secretValue" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .secret -}}
{{- if .value -}}
{{- .value | toString | b64enc -}}
{{- else if and $existing (hasKey ($existing.data | default dict) .key) -}}
{{- index $existing.data .key -}}
{{- else -}}
{{- printf "%s%s" .prefix (randAlphaNum (int .length)) | b64enc -}}
{{- end -}}
{{- end -}}

{{/* A component's pods as a Prometheus label matcher: (dict "root" $ "component" "asr").
Deployment pods are named <deployment>-<replicaset hash>-<pod hash>, except that
Kubernetes cuts the generated part's base to 58 characters, so a long Deployment name
keeps only its first 57 characters (+ "-") in its pods' names: match that prefix. No
component's name is another's followed by "-", so the prefix selects one component. */}}
{{- define "cascade.promPodMatcher" -}}
{{- $prefix := printf "%s-" (include "cascade.componentName" (dict "root" .root "component" .component)) | trunc 58 -}}
{{- printf "namespace=%q,pod=~%q" .root.Release.Namespace (printf "%s[a-z0-9-]+" $prefix) -}}
{{- end -}}

{{/* The TCP port of a URL: its explicit port, else the scheme's default
(https 443, rediss/redis 6379, otherwise 80). */}}
{{- define "cascade.urlPort" -}}
{{- $u := urlParse . -}}
{{- if regexMatch ":[0-9]+$" $u.host -}}
{{- regexFind "[0-9]+$" $u.host -}}
{{- else if eq $u.scheme "https" -}}
443
{{- else if has $u.scheme (list "redis" "rediss") -}}
6379
{{- else -}}
80
{{- end -}}
{{- end -}}

{{/* A pod template's labels: the component's podLabels under the chart's own (which
win, so the selector always matches): (dict "root" $ "component" "asr" "extra" map). */}}
{{- define "cascade.podLabels" -}}
{{- $own := include "cascade.labels" (dict "root" .root "component" .component) | fromYaml -}}
{{- toYaml (merge $own (.extra | default dict)) -}}
{{- end -}}

{{/* The stage key as env var .name (CASCADE_STAGE_API_KEY, VLLM_API_KEY) from its Secret,
while stageAuth.enabled: (dict "root" $ "name" "CASCADE_STAGE_API_KEY"). */}}
{{- define "cascade.stageKeyEnv" -}}
{{- $a := .root.Values.stageAuth -}}
{{- if $a.enabled }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      {{- if $a.existingSecret }}
      name: {{ $a.existingSecret }}
      key: {{ $a.existingSecretKey }}
      {{- else }}
      name: {{ include "cascade.orchestratorSecretName" .root }}
      key: stage-api-key
      {{- end }}
{{- end }}
{{- end -}}
