{{/*
The pod template of a Ray node (head, prefill or decode group). Argument: dict
  "root" $            the chart context
  "component" NAME    head | prefill | decode
  "spec" VALUES       .Values.head, or .Values.prefill.group / .Values.decode.group
  "gpus" N            nvidia.com/gpu per pod (0 for the head)
  "ranksPerPod" N     (workers) expert-parallel ranks a pod holds, read by the planner
  "diskCacheDir" DIR  (workers) the context cache's folder, when the kind has one
*/}}
{{- define "dsaserve.rayPodTemplate" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $spec := .spec -}}
{{- $isHead := eq .component "head" -}}
{{- /* No chart version or config checksum here: a changed pod template makes KubeRay build a new
     cluster, and KubeRay applies serveConfigV2 changes (replica counts) without one. */}}
metadata:
  labels:
    {{- include "dsaserve.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/part-of: dsaserve
    app.kubernetes.io/component: {{ .component }}
    {{- with $spec.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- $annotations := deepCopy (default (dict) $spec.podAnnotations) }}
  {{- if not $isHead }}
  {{- $_ := set $annotations "dsaserve.io/ranks-per-pod" (toString .ranksPerPod) }}
  {{- end }}
  {{- with $annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  automountServiceAccountToken: false
  enableServiceLinks: false
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $v.podSecurityContext | nindent 4 }}
  {{- with $spec.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $spec.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $spec.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $spec.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if $v.model.fetch.enabled }}
  initContainers:
    - name: fetch-model
      image: {{ include "dsaserve.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      {{- if $v.model.fetch.command }}
      command:
        {{- toYaml $v.model.fetch.command | nindent 8 }}
      {{- else }}
      command:
        - python
        - -c
        - |
          import os
          from huggingface_hub import snapshot_download
          allow = [p for p in os.environ.get("MODEL_ALLOW", "").split(",") if p] or None
          path = snapshot_download(repo_id=os.environ["MODEL_REPO"], revision=os.environ["MODEL_REVISION"],
                                   local_dir=os.environ["MODEL_DIR"], allow_patterns=allow)
          print("dsaserve: model ready in", path, flush=True)
      {{- end }}
      env:
        - {name: MODEL_REPO, value: {{ $v.model.fetch.repo | quote }}}
        - {name: MODEL_REVISION, value: {{ $v.model.fetch.revision | quote }}}
        - {name: MODEL_DIR, value: {{ $v.model.path | quote }}}
        - {name: MODEL_ALLOW, value: {{ ternary "*.json,*.model,*.txt,*.jinja" "" (and $isHead $v.model.fetch.headConfigOnly) | quote }}}
        - {name: HF_HOME, value: /tmp/hf}
        {{- with $v.model.fetch.tokenSecret.name }}
        - name: HF_TOKEN
          valueFrom:
            secretKeyRef: {name: {{ . }}, key: {{ $v.model.fetch.tokenSecret.key }}}
        {{- end }}
      resources:
        {{- toYaml $v.model.fetch.resources | nindent 8 }}
      securityContext:
        {{- toYaml $v.securityContext | nindent 8 }}
      volumeMounts:
        - {name: model, mountPath: {{ $v.model.volume.mountPath }}}
        - {name: fetch-tmp, mountPath: /tmp}
  {{- end }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" $isHead }}
      image: {{ include "dsaserve.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      env:
        - {name: TOKENIZERS_PARALLELISM, value: "false"}
        - {name: DSASERVE_CACHE, value: /home/ray/.cache/dsaserve}
        {{- if eq (include "dsaserve.redisPasswordFromSecret" $root) "true" }}
        - name: REDIS_PASSWORD
          valueFrom:
            secretKeyRef: {name: {{ include "dsaserve.redisSecretName" $root }}, key: {{ include "dsaserve.redisSecretKey" $root }}}
        {{- end }}
        {{- if or $v.apiKeys.keys $v.apiKeys.existingSecret }}
        - name: DSASERVE_API_KEYS
          valueFrom:
            secretKeyRef: {name: {{ include "dsaserve.apiKeysSecretName" $root }}, key: {{ $v.apiKeys.secretKey }}}
        {{- end }}
        {{- with $spec.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        {{- if $isHead }}
        - {name: gcs-server, containerPort: 6379}
        - {name: dashboard, containerPort: 8265}
        - {name: client, containerPort: 10001}
        {{- end }}
        - {name: serve, containerPort: {{ $v.router.http_port | int }}}
        {{- if $v.tls.enabled }}
        - {name: grpc-plain, containerPort: {{ include "dsaserve.serveGrpcPort" $root }}}
        {{- else }}
        - {name: grpc, containerPort: {{ $v.router.grpc_port | int }}}
        {{- end }}
        - {name: metrics, containerPort: {{ $v.metrics.port | int }}}
      {{- $res := deepCopy $spec.resources }}
      {{- if gt (int .gpus) 0 }}
      {{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" (int .gpus)) (default (dict) $res.limits)) }}
      {{- $_ := set $res "requests" (merge (dict "nvidia.com/gpu" (int .gpus)) (default (dict) $res.requests)) }}
      {{- end }}
      resources:
        {{- toYaml $res | nindent 8 }}
      securityContext:
        {{- toYaml $v.securityContext | nindent 8 }}
      {{- with $v.router.readinessProbe }}
      {{- if and .enabled (not $isHead) }}
      readinessProbe:
        exec:
          command:
            - dsaserve
            - client
            - health
            - "--address=127.0.0.1:{{ include "dsaserve.serveGrpcPort" $root }}"
            - "--timeout={{ max 1 (sub (int .timeoutSeconds) 3) }}"
        initialDelaySeconds: {{ .initialDelaySeconds | int }}
        periodSeconds: {{ .periodSeconds | int }}
        timeoutSeconds: {{ .timeoutSeconds | int }}
        failureThreshold: {{ .failureThreshold | int }}
      {{- end }}
      {{- end }}
      {{- if not $isHead }}
      lifecycle:
        preStop:
          exec:
            command: ["/bin/sh", "-c", "ray stop"]
      {{- end }}
      volumeMounts:
        - {name: dshm, mountPath: /dev/shm}
        - {name: ray-logs, mountPath: /tmp/ray}
        {{- if ne $v.model.volume.type "none" }}
        - {name: model, mountPath: {{ $v.model.volume.mountPath }}, readOnly: true}
        {{- end }}
        {{- with .diskCacheDir }}
        - {name: disk-cache, mountPath: {{ . }}}
        {{- end }}
        {{- if and (not $isHead) $v.sharedDiskCache $v.sharedDiskCache.enabled }}
        - {name: shared-kv-cache, mountPath: {{ $v.sharedDiskCache.mountPath }}}
        {{- end }}
        {{- if and (not $v.redis.enabled) $v.redis.external.tls.secretName }}
        - {name: redis-tls, mountPath: {{ include "dsaserve.redisTlsDir" $root }}, readOnly: true}
        {{- end }}
    {{- if and $isHead $v.tls.enabled }}
    {{- $dir := include "dsaserve.tlsDir" $root }}
    {{- /* Serve's gRPC proxy has no TLS: this terminates it on the public port and forwards every call. */}}
    - name: tls-front
      image: {{ include "dsaserve.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      command: [dsaserve, tls-front]
      args:
        - "--listen=[::]:{{ $v.router.grpc_port | int }}"
        - "--upstream=127.0.0.1:{{ include "dsaserve.serveGrpcPort" $root }}"
        - "--tls-cert={{ $dir }}/tls.crt"
        - "--tls-key={{ $dir }}/tls.key"
        {{- if $v.tls.clientAuth }}
        - "--tls-client-ca={{ $dir }}/ca.crt"
        {{- end }}
      ports:
        - {name: grpc, containerPort: {{ $v.router.grpc_port | int }}}
      readinessProbe:
        tcpSocket: {port: grpc}
        periodSeconds: 5
      resources:
        {{- toYaml $v.tls.resources | nindent 8 }}
      securityContext:
        {{- toYaml (merge (dict "readOnlyRootFilesystem" true) $v.securityContext) | nindent 8 }}
      volumeMounts:
        - {name: tls, mountPath: {{ $dir }}, readOnly: true}
    {{- end }}
  volumes:
    - name: dshm
      emptyDir: {medium: Memory, sizeLimit: {{ $spec.shmSize }}}
    - name: ray-logs
      emptyDir: {}
    {{- if $v.model.fetch.enabled }}
    - name: fetch-tmp
      emptyDir: {}
    {{- end }}
    {{- if and (not $isHead) $v.sharedDiskCache $v.sharedDiskCache.enabled }}
    - name: shared-kv-cache
      persistentVolumeClaim: {claimName: {{ $v.sharedDiskCache.pvc.claimName }}}
    {{- end }}
    {{- if .diskCacheDir }}
    {{- with $spec.diskCacheVolume }}
    - name: disk-cache
      {{- if eq .type "hostPath" }}
      hostPath: {path: {{ .hostPath }}, type: DirectoryOrCreate}
      {{- else }}
      emptyDir: {sizeLimit: {{ .sizeLimit }}}
      {{- end }}
    {{- end }}
    {{- end }}
    {{- if and (not $v.redis.enabled) $v.redis.external.tls.secretName }}
    - name: redis-tls
      secret: {secretName: {{ $v.redis.external.tls.secretName }}, defaultMode: 0440}
    {{- end }}
    {{- if and $isHead $v.tls.enabled }}
    - name: tls
      secret: {secretName: {{ include "dsaserve.tlsSecretName" $root }}, defaultMode: 0440}
    {{- end }}
    {{- with $v.model.volume }}
    {{- if eq .type "pvc" }}
    - name: model
      persistentVolumeClaim: {claimName: {{ .pvc.claimName }}}
    {{- else if eq .type "hostPath" }}
    - name: model
      hostPath: {path: {{ .hostPath.path }}, type: {{ .hostPath.type }}}
    {{- else if eq .type "emptyDir" }}
    - name: model
      emptyDir: {sizeLimit: {{ .emptyDir.sizeLimit }}}
    {{- end }}
    {{- end }}
{{- end -}}
