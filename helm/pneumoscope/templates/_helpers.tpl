{{/* Names, labels and the pieces every workload shares. */}}

{{- define "pneumoscope.tag" -}}
{{- .Values.images.tag | default .Chart.AppVersion -}}
{{- end -}}

{{- define "pneumoscope.image" -}}
{{- printf "%s/%s:%s" (trimSuffix "/" .root.Values.images.registry) .name (include "pneumoscope.tag" .root) -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "pneumoscope.labels" -}}
app.kubernetes.io/part-of: pneumoscope
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{/* Selector labels of one component: .root, .component. */}}
{{- define "pneumoscope.selector" -}}
app.kubernetes.io/name: {{ printf "%s-%s" .root.Release.Name .component }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{- define "pneumoscope.componentLabels" -}}
{{ include "pneumoscope.labels" .root }}
{{ include "pneumoscope.selector" . }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Non-root, read-only root filesystem, no privilege escalation, no capabilities: every container. */}}
{{- define "pneumoscope.containerSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: {{ .uid | default 10001 }}
  runAsGroup: {{ .gid | default 10001 }}
  readOnlyRootFilesystem: true
  allowPrivilegeEscalation: false
  privileged: false
  capabilities:
    drop: [ALL]
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{- define "pneumoscope.podSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: {{ .uid | default 10001 }}
  runAsGroup: {{ .gid | default 10001 }}
  fsGroup: {{ .gid | default 10001 }}
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{/* Required Secret names fail with the value's name. */}}
{{- define "pneumoscope.required" -}}
{{- required (printf "%s is required: the name of an existing Secret (%s)" .name .keys) .value -}}
{{- end -}}

{{/* S3 credentials and endpoint as environment variables (boto3 / MLflow read these). */}}
{{- define "pneumoscope.s3Env" -}}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "pneumoscope.required" (dict "name" "s3.secretName" "keys" "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY" "value" .Values.s3.secretName) }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.s3.secretName }}
      key: AWS_SECRET_ACCESS_KEY
- name: AWS_DEFAULT_REGION
  value: {{ .Values.s3.region | quote }}
{{- with .Values.s3.endpointUrl }}
- name: AWS_ENDPOINT_URL_S3
  value: {{ . | quote }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- end -}}

{{/* The MLflow tracking URI the servers and the web app see. */}}
{{- define "pneumoscope.mlflowUri" -}}
{{- if .Values.mlflow.enabled -}}
{{- printf "http://%s-mlflow:5000" .Release.Name -}}
{{- else -}}
{{- .Values.mlflow.externalUri -}}
{{- end -}}
{{- end -}}

{{/* Where the model comes from, for one server: /mnt/models (storage initializer) or models:/NAME/N. */}}
{{- define "pneumoscope.modelUri" -}}
{{- $m := .Values.inference.model -}}
{{- if and $m.storageUri $m.registryUri -}}
{{- fail "inference.model: set storageUri or registryUri, not both" -}}
{{- else if and $m.storageUri (not $m.sha256) -}}
{{- fail "inference.model.sha256 is required with storageUri: the bundle's expected digest (the registry version's bundle_sha256 tag); a folder is never served unverified" -}}
{{- else if $m.storageUri -}}
/mnt/models
{{- else if regexMatch "^models:/[^/@]+/[0-9]+$" $m.registryUri -}}
{{- $m.registryUri -}}
{{- else -}}
{{- fail (printf "inference.model.registryUri must be models:/NAME/VERSION with a version number (a revision pins one version), not %q; or set inference.model.storageUri" $m.registryUri) -}}
{{- end -}}
{{- end -}}

{{/* The model version a revision pins: registryUri's number, else inference.model.version ("" = unknown). */}}
{{- define "pneumoscope.modelVersion" -}}
{{- $m := .Values.inference.model -}}
{{- if $m.registryUri -}}
{{- regexReplaceAll "^models:/[^/@]+/" $m.registryUri "" -}}
{{- else -}}
{{- $m.version -}}
{{- end -}}
{{- end -}}

{{- define "pneumoscope.knative" -}}
{{- if eq .Values.inference.deploymentMode "Serverless" }}true{{ end -}}
{{- end -}}

{{/* Before SIGTERM: a short sleep while the endpoints and the ingress stop routing to the pod (then the
server drains what it holds; see inference.drainSeconds). */}}
{{- define "pneumoscope.preStop" -}}
lifecycle:
  preStop:
    exec:
      command: [sleep, {{ .Values.inference.preStopSeconds | quote }}]
{{- end -}}

{{/* preStop sleep + drain + a margin: the kubelet never kills a server that is still draining. */}}
{{- define "pneumoscope.terminationGrace" -}}
terminationGracePeriodSeconds: {{ add .Values.inference.preStopSeconds .Values.inference.drainSeconds 10 }}
{{- end -}}
