{{/* Names and labels. The RayService name stays short: KubeRay derives cluster and Service names from it. */}}
{{- define "dsaserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "dsaserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "dsaserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dsaserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dsaserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "dsaserve.labels" -}}
helm.sh/chart: {{ include "dsaserve.chart" . }}
{{ include "dsaserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dsaserve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "dsaserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "dsaserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "dsaserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "dsaserve.redisSecretName" -}}
{{- if .Values.redis.enabled -}}
{{- default (printf "%s-redis" (include "dsaserve.fullname" .)) .Values.redis.auth.existingSecret -}}
{{- else -}}
{{- .Values.redis.external.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "dsaserve.redisSecretKey" -}}
{{- if .Values.redis.enabled -}}{{ .Values.redis.auth.secretKey }}{{- else -}}{{ .Values.redis.external.secretKey }}{{- end -}}
{{- end -}}

{{/* True ("true") when Ray pods get REDIS_PASSWORD from a Secret. */}}
{{- define "dsaserve.redisPasswordFromSecret" -}}
{{- if .Values.redis.enabled -}}{{ .Values.redis.auth.enabled }}{{- else -}}{{ not (empty .Values.redis.external.existingSecret) }}{{- end -}}
{{- end -}}

{{/* The KV index URL; `${REDIS_PASSWORD}` is filled from the pods' environment. Empty: no Redis. */}}
{{- define "dsaserve.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- $host := printf "%s-redis.%s.svc" (include "dsaserve.fullname" .) .Release.Namespace -}}
{{- if .Values.redis.auth.enabled -}}
{{- printf "redis://:${REDIS_PASSWORD}@%s:6379/0" $host -}}
{{- else -}}
{{- printf "redis://%s:6379/0" $host -}}
{{- end -}}
{{- else -}}
{{- .Values.redis.external.url -}}
{{- end -}}
{{- end -}}

{{- define "dsaserve.apiKeysSecretName" -}}
{{- default (printf "%s-api-keys" (include "dsaserve.fullname" .)) .Values.apiKeys.existingSecret -}}
{{- end -}}

{{/*
Ranks of a worker kind that fit in one pod: gpusPerPod / num_gpus on GPU groups, ranksPerPod on CPU
groups. Argument: the kind's values (.Values.prefill or .Values.decode).
*/}}
{{- define "dsaserve.ranksPerPod" -}}
{{- if gt (float64 .num_gpus) 0.0 -}}
{{- floor (divf .group.gpusPerPod .num_gpus) | int -}}
{{- else -}}
{{- .group.ranksPerPod | int -}}
{{- end -}}
{{- end -}}

{{/* Worker pods for N Serve replicas: ceil(N * ep_size / ranksPerPod). Argument: dict "kind" "n". */}}
{{- define "dsaserve.podsFor" -}}
{{- $rpp := include "dsaserve.ranksPerPod" .kind | int -}}
{{- ceil (divf (mul (int .n) (int .kind.ep_size)) $rpp) | int -}}
{{- end -}}

{{/* One worker kind's ClusterConfig mapping (WorkerGroupConfig). */}}
{{- define "dsaserve.workerArgs" -}}
{{- $a := dict "replicas" (int .replicas) "num_blocks" (int .num_blocks) "max_num_seqs" (int .max_num_seqs)
      "max_num_batched_tokens" (int .max_num_batched_tokens) "num_cpus" (float64 .num_cpus)
      "num_gpus" (float64 .num_gpus) "torch_threads" (int .torch_threads)
      "host_cache_blocks" (int (default 0 .host_cache_blocks)) "disk_cache_blocks" (int (default 0 .disk_cache_blocks)) -}}
{{- /* ep_size 1 is ClusterConfig's default: written only above 1, like the optional keys below. */ -}}
{{- if gt (int .ep_size) 1 -}}
{{- $_ := set $a "ep_size" (int .ep_size) -}}
{{- end -}}
{{- if not (kindIs "invalid" .ep_timeout_s) -}}
{{- $_ := set $a "ep_timeout_s" (float64 .ep_timeout_s) -}}
{{- end -}}
{{- with .disk_cache_dir -}}
{{- $_ := set $a "disk_cache_dir" . -}}
{{- end -}}
{{- if not (kindIs "invalid" .kv_memory_fraction) -}}
{{- $_ := set $a "kv_memory_fraction" (float64 .kv_memory_fraction) -}}
{{- end -}}
{{- if not (kindIs "invalid" .kv_memory_bytes) -}}
{{- $_ := set $a "kv_memory_bytes" (int64 .kv_memory_bytes) -}}
{{- end -}}
{{- if not (kindIs "invalid" .cuda_graph_max_batch) -}}
{{- $_ := set $a "cuda_graph_max_batch" (int .cuda_graph_max_batch) -}}
{{- end -}}
{{- /* One unit of the resource its worker group's pods offer: replicas stay on their own group. */ -}}
{{- $_ := set $a "resources" (dict (printf "dsaserve_%s" .kind) 1.0) -}}
{{- toYaml $a -}}
{{- end -}}

{{/* The port of Serve's gRPC proxy on every Ray pod: router.grpc_port, or behind the TLS front tls.proxyPort. */}}
{{- define "dsaserve.serveGrpcPort" -}}
{{- if .Values.tls.enabled }}{{ .Values.tls.proxyPort | int }}{{ else }}{{ .Values.router.grpc_port | int }}{{ end -}}
{{- end -}}

{{- define "dsaserve.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "dsaserve.fullname" .)) .Values.tls.secretName -}}
{{- end -}}

{{/* Where the gRPC API's TLS Secret is mounted in the head pod's tls-front container. */}}
{{- define "dsaserve.tlsDir" -}}/etc/dsaserve/tls{{- end -}}

{{/* Where a TLS Secret for an external Redis is mounted. */}}
{{- define "dsaserve.redisTlsDir" -}}/etc/dsaserve/redis-tls{{- end -}}

{{/* ClusterConfig.redis: connection options (the password travels in the URL as ${REDIS_PASSWORD}). */}}
{{- define "dsaserve.redisArgs" -}}
{{- $c := .Values.redis.client -}}
{{- $a := dict "worker_ttl_s" (float64 $c.worker_ttl_s) -}}
{{- with $c.username }}{{ $_ := set $a "username" . }}{{ end -}}
{{- $tls := .Values.redis.external.tls -}}
{{- if and (not .Values.redis.enabled) $tls.secretName -}}
{{- $dir := include "dsaserve.redisTlsDir" . -}}
{{- with $tls.caKey }}{{ $_ := set $a "ssl_ca_certs" (printf "%s/%s" $dir .) }}{{ end -}}
{{- with $tls.certKey }}{{ $_ := set $a "ssl_certfile" (printf "%s/%s" $dir .) }}{{ end -}}
{{- with $tls.keyKey }}{{ $_ := set $a "ssl_keyfile" (printf "%s/%s" $dir .) }}{{ end -}}
{{- end -}}
{{- toYaml $a -}}
{{- end -}}

{{/* ClusterConfig.router.limits: integers, as RequestLimits takes them. */}}
{{- define "dsaserve.limitArgs" -}}
{{- $a := dict -}}
{{- range $k, $v := .Values.router.limits }}{{ $_ := set $a $k (int $v) }}{{ end -}}
{{- toYaml $a -}}
{{- end -}}

{{/* serveConfigV2's args: exactly ClusterConfig's fields (it forbids unknown keys). */}}
{{- define "dsaserve.clusterArgs" -}}
{{- $v := .Values -}}
{{- $router := dict "grpc_port" (int $v.router.grpc_port) "http_port" (int $v.router.http_port) "host" "0.0.0.0"
      "max_queue" (int $v.router.max_queue) "replicas" (int $v.router.replicas)
      "startup_timeout_s" (float64 $v.router.startup_timeout_s) "limits" (include "dsaserve.limitArgs" . | fromYaml)
      "jobs" (dict "enabled" $v.router.jobs.enabled "limits" ($v.router.jobs.limits | default dict)) -}}
{{- $routing := dict "policy" $v.routing.policy "alpha" (float64 $v.routing.alpha) "beta" (float64 $v.routing.beta)
      "local_prefill_max_tokens" (int $v.routing.local_prefill_max_tokens) "temperature_s" (float64 $v.routing.temperature_s) -}}
{{- if hasKey $v.routing "peer_pulls" }}{{ $_ := set $routing "peer_pulls" $v.routing.peer_pulls }}{{ end -}}
{{- if hasKey $v.routing "pending_ttl_s" }}{{ $_ := set $routing "pending_ttl_s" (float64 $v.routing.pending_ttl_s) }}{{ end -}}
{{- range $k := list "link_bytes_per_s" "linear_flops_per_s" "index_flops_per_s" -}}
{{- $x := index $v.routing $k -}}
{{- if not (kindIs "invalid" $x) }}{{ $_ := set $routing $k (float64 $x) }}{{ end -}}
{{- end -}}
{{- $args := dict "model" $v.model.path "transfer" $v.transfer "router" $router "routing" $routing
      "block_size" (int $v.block_size) "lease_s" (float64 $v.lease_s) "transfer_timeout_s" (float64 $v.transfer_timeout_s)
      "dtype" $v.dtype "device" (default "auto" $v.device) "app_name" $v.app_name
      "fp8_weights" (default "resident" $v.fp8_weights)
      "prefill" (include "dsaserve.workerArgs" (merge (dict "kind" "prefill") $v.prefill) | fromYaml)
      "decode" (include "dsaserve.workerArgs" (merge (dict "kind" "decode") $v.decode) | fromYaml) -}}
{{- with (include "dsaserve.redisUrl" .) -}}
{{- $_ := set $args "redis_url" . -}}
{{- $_ := set $args "redis" (include "dsaserve.redisArgs" $ | fromYaml) -}}
{{- end -}}
{{- if not (kindIs "invalid" $v.max_model_len) -}}
{{- $_ := set $args "max_model_len" (int $v.max_model_len) -}}
{{- end -}}
{{- with $v.sharedDiskCache -}}
{{- if .enabled -}}
{{- $_ := set $args "shared_disk_cache" (dict "dir" .mountPath "max_blocks" (int .max_blocks)) -}}
{{- end -}}
{{- end -}}
{{- toYaml $args -}}
{{- end -}}

{{/* The Ray Serve config (ServeDeploySchema) KubeRay deploys. */}}
{{- define "dsaserve.serveConfig" -}}
proxy_location: {{ .Values.proxyLocation }}
http_options:
  host: 0.0.0.0
  port: {{ .Values.router.http_port | int }}
grpc_options:
  port: {{ include "dsaserve.serveGrpcPort" . }}
  grpc_servicer_functions:
    - router.proto.dsaserve.v1.dsaserve_pb2_grpc.add_DsaServeServicer_to_server
    - router.proto.dsaserve.v1.dsaserve_pb2_grpc.add_BatchJobsServicer_to_server
    - grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server
applications:
  - name: {{ .Values.app_name }}
    import_path: cluster.app:app_builder
    route_prefix: /
    runtime_env:
      env_vars:
        TOKENIZERS_PARALLELISM: "false"
    args:
      {{- include "dsaserve.clusterArgs" . | nindent 6 }}
{{- end -}}

{{/* Checks JSON schema cannot express; each names the values to change. */}}
{{- define "dsaserve.validate" -}}
{{- range $kind := list "prefill" "decode" -}}
{{- $k := index $.Values $kind -}}
{{- if and (gt (float64 $k.num_gpus) 0.0) (lt (float64 $k.group.gpusPerPod) (float64 $k.num_gpus)) -}}
{{- fail (printf "%s.num_gpus is %v but %s.group.gpusPerPod is %v: a rank would never fit in a pod (set gpusPerPod >= num_gpus, or num_gpus: 0 on CPU nodes)" $kind $k.num_gpus $kind $k.group.gpusPerPod) -}}
{{- end -}}
{{- if and (eq (float64 $k.num_gpus) 0.0) (gt (int $k.group.gpusPerPod) 0) -}}
{{- fail (printf "%s.group.gpusPerPod is %v but %s.num_gpus is 0: the pods would hold GPUs no replica uses" $kind $k.group.gpusPerPod $kind) -}}
{{- end -}}
{{- if and $k.disk_cache_dir (not $k.group.diskCacheVolume) -}}
{{- fail (printf "%s.disk_cache_dir is set but %s.group.diskCacheVolume is not: the context cache needs a volume" $kind $kind) -}}
{{- end -}}
{{- if $.Values.planner.enabled -}}
{{- $b := index $.Values.planner $kind -}}
{{- if or (gt (int $b.minReplicas) (int $k.replicas)) (lt (int $b.maxReplicas) (int $k.replicas)) -}}
{{- fail (printf "planner.%s: minReplicas %v <= %s.replicas %v <= maxReplicas %v must hold" $kind $b.minReplicas $kind $k.replicas $b.maxReplicas) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and .Values.redis.enabled .Values.redis.external.url -}}
{{- fail "redis.enabled and redis.external.url are both set: use the chart's Redis (enabled) or an external one (enabled: false + external.url)" -}}
{{- end -}}
{{- if and (eq .Values.model.volume.type "pvc") (not .Values.model.volume.pvc.claimName) -}}
{{- fail "model.volume.type is pvc but model.volume.pvc.claimName is empty" -}}
{{- end -}}
{{- if and .Values.model.fetch.enabled (eq .Values.model.volume.type "none") -}}
{{- fail "model.fetch.enabled needs a model volume to fill (model.volume.type: pvc, hostPath or emptyDir)" -}}
{{- end -}}
{{- $mount := trimSuffix "/" .Values.model.volume.mountPath -}}
{{- if and .Values.model.fetch.enabled (not (hasPrefix (printf "%s/" $mount) .Values.model.path)) -}}
{{- fail (printf "model.path (%s) must be under model.volume.mountPath (%s) for model.fetch to fill it" .Values.model.path .Values.model.volume.mountPath) -}}
{{- end -}}
{{- $ports := list (int .Values.router.grpc_port) (int .Values.router.http_port) (int .Values.metrics.port) -}}
{{- if ne (len (uniq $ports)) 3 -}}
{{- fail (printf "router.grpc_port (%v), router.http_port (%v) and metrics.port (%v) must differ" .Values.router.grpc_port .Values.router.http_port .Values.metrics.port) -}}
{{- end -}}
{{- $tls := .Values.tls -}}
{{- if $tls.enabled -}}
{{- if has (int $tls.proxyPort) $ports -}}
{{- fail (printf "tls.proxyPort (%v) must differ from router.grpc_port, router.http_port and metrics.port" $tls.proxyPort) -}}
{{- end -}}
{{- $inline := or $tls.cert $tls.key $tls.ca -}}
{{- if and $tls.secretName $inline -}}
{{- fail "tls.secretName and tls.cert/key/ca are both set: name an existing Secret, or give the PEM text, not both" -}}
{{- end -}}
{{- if and (not $tls.secretName) (not (and $tls.cert $tls.key)) -}}
{{- fail "tls.enabled needs tls.secretName (an existing kubernetes.io/tls Secret) or both tls.cert and tls.key" -}}
{{- end -}}
{{- if and $tls.clientAuth (not $tls.secretName) (not $tls.ca) -}}
{{- fail "tls.clientAuth needs the CA that signs client certificates: tls.ca (or ca.crt in tls.secretName)" -}}
{{- end -}}
{{- end -}}
{{- end -}}
