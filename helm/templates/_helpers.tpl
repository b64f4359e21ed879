{{/*
Chart name, overridable with nameOverride. Truncated to 63 characters (a DNS label).
*/}}
{{- define "dflare.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: fullnameOverride, else "<release>-<chart>", or the release name alone when
it already contains the chart name. Truncated to 63 characters because some Kubernetes name fields
are limited to that (DNS labels).
*/}}
{{- define "dflare.fullname" -}}
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
Name of one component's objects: "<fullname>-gateway", "<fullname>-engine".
Usage: include "dflare.componentName" (list . "engine")
*/}}
{{- define "dflare.componentName" -}}
{{- $root := index . 0 }}
{{- printf "%s-%s" (include "dflare.fullname" $root | trunc 55 | trimSuffix "-") (index . 1) }}
{{- end }}

{{/*
Chart name and version, as used by the helm.sh/chart label.
*/}}
{{- define "dflare.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: name + instance only, because selectors are immutable after the first install.
*/}}
{{- define "dflare.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dflare.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Common labels on every object.
*/}}
{{- define "dflare.labels" -}}
helm.sh/chart: {{ include "dflare.chart" . }}
{{ include "dflare.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dflare-serve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Labels of one component's pod template: only labels that stay the same across chart versions
(selector, component, part-of, commonLabels). helm.sh/chart and app.kubernetes.io/version change
with every chart release, and a changed pod template restarts every GPU engine.
Usage: include "dflare.podLabels" (list . "engine")
*/}}
{{- define "dflare.podLabels" -}}
{{ include "dflare.componentSelectorLabels" . }}
app.kubernetes.io/part-of: dflare-serve
{{- with (index . 0).Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels of one component (adds app.kubernetes.io/component: gateway|engine). The engine's
component label is what the gateway's Kubernetes discovery selects on.
Usage: include "dflare.componentSelectorLabels" (list . "engine")
*/}}
{{- define "dflare.componentSelectorLabels" -}}
{{ include "dflare.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/*
Common labels of one component.
Usage: include "dflare.componentLabels" (list . "gateway")
*/}}
{{- define "dflare.componentLabels" -}}
{{ include "dflare.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/*
Label selector (string form) the gateway's discovery uses to find this release's engine pods.
*/}}
{{- define "dflare.engineLabelSelector" -}}
{{- printf "app.kubernetes.io/component=engine,app.kubernetes.io/name=%s,app.kubernetes.io/instance=%s" (include "dflare.name" .) .Release.Name }}
{{- end }}

{{/*
Container image reference: registry/repository:tag, or @digest when a digest is set. The tag
defaults to the chart's appVersion.
Usage: include "dflare.image" (list . .Values.gateway.image)
*/}}
{{- define "dflare.image" -}}
{{- $root := index . 0 }}
{{- $image := index . 1 }}
{{- $registry := default $root.Values.global.imageRegistry $image.registry }}
{{- if not $registry }}
{{- fail "global.imageRegistry is not set. No public registry publishes the DFlare Serve images: build and push them with `deploy/build-push.sh REGISTRY` (deploy/README.md), then install with --set global.imageRegistry=REGISTRY" }}
{{- end }}
{{- $repository := printf "%s/%s" $registry $image.repository }}
{{- if $image.digest }}
{{- printf "%s@%s" $repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (default $root.Chart.AppVersion $image.tag | toString) }}
{{- end }}
{{- end }}

{{/*
The gateway's ServiceAccount name.
*/}}
{{- define "dflare.serviceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create }}
{{- default (include "dflare.componentName" (list . "gateway")) .Values.gateway.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.gateway.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Name of the Secret that holds the gateway's API keys (one per line).
*/}}
{{- define "dflare.apiKeysSecretName" -}}
{{- default (printf "%s-api-keys" (include "dflare.fullname" .)) .Values.gateway.auth.existingSecret }}
{{- end }}

{{/*
Where the gateway reads its API keys file.
*/}}
{{- define "dflare.apiKeysMountPath" -}}
/etc/dflare/api-keys
{{- end }}

{{/*
Base URL of the gateway Service inside the cluster.
*/}}
{{- define "dflare.gatewayURL" -}}
{{- printf "http://%s.%s.svc:%d" (include "dflare.componentName" (list . "gateway")) .Release.Namespace (int .Values.gateway.service.port) }}
{{- end }}

{{/*
Directory name under the model cache for a Hugging Face repo id at a revision, so that a new revision
is a new directory (downloaded again) rather than a stale cache hit:
("Qwen/Qwen3-8B", "") -> "Qwen--Qwen3-8B@main", ("a/b", "refs/pr/1") -> "a--b@refs--pr--1".
Usage: include "dflare.modelDirName" (list "Qwen/Qwen3-8B" "")
*/}}
{{- define "dflare.modelDirName" -}}
{{- printf "%s@%s" (index . 0) (default "main" (index . 1)) | replace "/" "--" }}
{{- end }}

{{/*
Path the engine loads a model from: the value itself when the weights are in the image, else the
download directory (repo and revision) in the model cache.
Usage: include "dflare.modelPath" (list . .Values.engine.model.target .Values.engine.model.targetRevision)
(the revision may be left out: "main").
*/}}
{{- define "dflare.modelPath" -}}
{{- $root := index . 0 }}
{{- $ref := index . 1 }}
{{- if eq $root.Values.engine.model.source "huggingface" }}
{{- $revision := "" }}
{{- if gt (len .) 2 }}{{ $revision = index . 2 }}{{ end }}
{{- printf "%s/%s" $root.Values.engine.modelCache.mountPath (include "dflare.modelDirName" (list $ref $revision)) }}
{{- else }}
{{- $ref }}
{{- end }}
{{- end }}

{{/*
Number of GPUs per engine pod, rendered as an integer (values may arrive as float64 from JSON).
*/}}
{{- define "dflare.engineGPUs" -}}
{{- int .Values.engine.gpu.count }}
{{- end }}

{{/*
"true" when the gateway discovers this release's engine pods through the Kubernetes API (engines
deployed, discovery on, no static backends), else empty.
*/}}
{{- define "dflare.discoveryEnabled" -}}
{{- if and .Values.engine.enabled .Values.gateway.discovery.enabled (empty .Values.gateway.backends) }}true{{ end }}
{{- end }}

{{/*
Seconds the gateway drains in-flight requests after SIGTERM (DFLARE_SHUTDOWN_GRACE_S): the value of
gateway.settings.shutdown_grace_s, else the request timeout, so no request the gateway allows is cut.
*/}}
{{- define "dflare.gatewayDrainSeconds" -}}
{{- $s := .Values.gateway.settings }}
{{- if hasKey $s "shutdown_grace_s" }}{{ $s.shutdown_grace_s | int }}{{ else }}{{ default 600 $s.request_timeout_s | int }}{{ end }}
{{- end }}

{{/*
Termination grace period of one component: the value when set (failing when it is shorter than the
drain it must cover), else the derived minimum. Usage: include "dflare.gracePeriod" (list . "engine")
Gateway: preStop + drain + 15. Engine: preStop + the gateway's request timeout + 30, so a request the
gateway still waits for is never killed under it.
*/}}
{{- define "dflare.gracePeriod" -}}
{{- $root := index . 0 }}
{{- $component := index . 1 }}
{{- $v := index $root.Values $component }}
{{- $need := 0 }}
{{- if eq $component "gateway" }}
{{- $need = add (int $v.preStopSleepSeconds) (include "dflare.gatewayDrainSeconds" $root | int) 15 }}
{{- else }}
{{- $need = add (int $v.preStopSleepSeconds) (default 600 $root.Values.gateway.settings.request_timeout_s | int) 30 }}
{{- end }}
{{- $set := int $v.terminationGracePeriodSeconds }}
{{- if and $set (lt $set (int $need)) }}
{{- fail (printf "%s.terminationGracePeriodSeconds=%d is shorter than the %d s its pods need to drain (preStop sleep + %s): raise it, set it to 0 (derived) or lower gateway.settings.request_timeout_s" $component $set (int $need) (ternary "gateway.settings.shutdown_grace_s + 15" "gateway.settings.request_timeout_s + 30" (eq $component "gateway"))) }}
{{- end }}
{{- default $need $set }}
{{- end }}

{{/*
"true" when the gateway sends an engine API key upstream and the engines require it.
*/}}
{{- define "dflare.engineAuth" -}}
{{- if and .Values.engine.auth.enabled (or .Values.engine.enabled .Values.gateway.backends) }}true{{ end }}
{{- end }}

{{/*
Name of the Secret holding the engine API key.
*/}}
{{- define "dflare.engineKeySecretName" -}}
{{- default (printf "%s-engine-api-key" (include "dflare.fullname" .)) .Values.engine.auth.existingSecret }}
{{- end }}

{{/*
Requests per engine the autoscaler counts as full: floor(maxRunningRequests * targetUtilization), >= 1.
*/}}
{{- define "dflare.engineScaleThreshold" -}}
{{- $e := .Values.engine }}
{{- max 1 (floor (mulf $e.maxRunningRequests $e.autoscaling.targetUtilization)) | int }}
{{- end }}

{{/*
Checksum of the chart-made engine key (its value only, not the Secret's labels, which carry the chart
version): pods that read it as an env var roll when it changes, and only then.
*/}}
{{- define "dflare.engineKeyChecksum" -}}
{{- $a := .Values.engine.auth }}
{{- printf "%s/%s/%s" $a.existingSecret $a.secretKey $a.apiKey | sha256sum }}
{{- end }}

{{/*
Nodes one engine spans: engine.multiNode.nodes with a multi-node engine (a LeaderWorkerSet), else 1.
*/}}
{{- define "dflare.engineNodes" -}}
{{- if .Values.engine.multiNode.enabled }}{{ int .Values.engine.multiNode.nodes }}{{ else }}1{{ end }}
{{- end }}

{{/*
SGLang's parallelism flags for one engine (--tp-size, and --dp-size above 1), after checking that they
use exactly the engine's GPUs: GPUs per pod x nodes = TP x DP. SGLang takes TP x DP GPUs per engine
and splits TP evenly over the nodes; a mismatch would leave GPUs idle or fail at run time, so it fails
rendering here instead. tensorParallelSize 0 means "all the engine's GPUs over dataParallelSize".
*/}}
{{- define "dflare.engineParallelArgs" -}}
{{- $e := .Values.engine }}
{{- $gpus := int $e.gpu.count }}
{{- $nodes := int (include "dflare.engineNodes" .) }}
{{- $dp := int $e.dataParallelSize }}
{{- $total := mul $gpus $nodes }}
{{- if and (gt $nodes 1) (gt $dp 1) }}
{{- fail (printf "engine.dataParallelSize is %d with engine.multiNode.enabled: SGLang runs data parallelism across nodes only with DP attention. For more copies of a multi-node engine raise engine.replicas instead" $dp) }}
{{- end }}
{{- $tp := int $e.tensorParallelSize }}
{{- if eq $tp 0 }}
{{- if ne (mod $total $dp) 0 }}
{{- fail (printf "engine.dataParallelSize %d does not divide the engine's %d GPU(s) (engine.gpu.count %d x %d node(s)): set engine.tensorParallelSize, or a GPU count that DP divides" $dp $total $gpus $nodes) }}
{{- end }}
{{- $tp = div $total $dp }}
{{- end }}
{{- if ne (mul $tp $dp) $total }}
{{- fail (printf "engine parallelism does not match its GPUs: engine.gpu.count %d x %d node(s) = %d GPU(s), but tensorParallelSize %d x dataParallelSize %d = %d. SGLang uses TP x DP GPUs per engine: make the two products equal (e.g. tensorParallelSize %d, or gpu.count %d)" $gpus $nodes $total $tp $dp (mul $tp $dp) (div $total $dp) (div (mul $tp $dp) $nodes)) }}
{{- end -}}
{{- /* the plugin refuses these at launch; fail here, before a pod crash-loops */ -}}
{{- if eq $e.speculative.verify "adaptive" }}
{{- if gt $dp 1 }}
{{- fail (printf "engine.speculative.verify=adaptive runs on one GPU or one tensor-parallel group per engine (rank 0 of the group plans every rank's verify), but engine.dataParallelSize is %d: use dataParallelSize 1 and more engine.replicas, or verify static" $dp) }}
{{- end }}
{{- if not (has $e.attentionBackend (list "fa3" "trtllm_mha")) }}
{{- fail (printf "engine.speculative.verify=adaptive needs engine.attentionBackend fa3 or trtllm_mha (SGLang captures ragged-verify CUDA graphs only there), got %q" $e.attentionBackend) }}
{{- end }}
{{- else if $e.speculative.draftBlocks }}
{{- fail (printf "engine.speculative.draftBlocks=%q needs engine.speculative.verify=adaptive (the adaptive policy chooses when to draft a shorter block)" $e.speculative.draftBlocks) }}
{{- end -}}
{{- if and $e.speculative.draftVocab (ne $e.speculative.algorithm "DFLARE") }}
{{- fail (printf "engine.speculative.draftVocab=%q needs engine.speculative.algorithm=DFLARE (SGLang's DFLASH drafts over every token)" $e.speculative.draftVocab) }}
{{- end -}}
- --tp-size
- {{ $tp | quote }}
{{- if gt $dp 1 }}
- --dp-size
- {{ $dp | quote }}
{{- end }}
{{- end }}

{{/*
The workload that runs the engines: a StatefulSet, or a LeaderWorkerSet for a multi-node engine (KEDA
scales either through its scale subresource). Usage: include "dflare.engineWorkloadRef" . | nindent 4
*/}}
{{- define "dflare.engineWorkloadRef" -}}
{{- if .Values.engine.multiNode.enabled -}}
apiVersion: leaderworkerset.x-k8s.io/v1
kind: LeaderWorkerSet
{{- else -}}
apiVersion: apps/v1
kind: StatefulSet
{{- end }}
name: {{ include "dflare.componentName" (list . "engine") }}
{{- end }}
