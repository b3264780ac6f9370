{{/* Name of the release's objects: the chart name, or release-chart when they differ. */}}
{{- define "dreambooth-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "dreambooth-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "dreambooth-operator.labels" -}}
{{ include "dreambooth-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "dreambooth-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "dreambooth-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "dreambooth-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
The operator's permissions, derived from what it calls (operator/kube.py, operator/handlers.py)
and what kopf needs. One list serves the ClusterRole and each namespaced Role.
*/}}
{{- define "dreambooth-operator.namespacedRules" -}}
# The jobs: kopf watches them and keeps its bookkeeping in annotations and a finalizer;
# the operator reads them, patches their status, and deletes those whose
# runPolicy.ttlSecondsAfterFinished has passed.
- apiGroups: [dreambooth.io]
  resources: [dreamboothjobs]
  verbs: [get, list, watch, patch, delete]
- apiGroups: [dreambooth.io]
  resources: [dreamboothjobs/status]
  verbs: [get, patch]
# Children carry an ownerReference with blockOwnerDeletion, which the API server
# allows only to who may update the owner's finalizers.
- apiGroups: [dreambooth.io]
  resources: [dreamboothjobs/finalizers]
  verbs: [update]
# Worker pods: watched (kopf), listed by job label, created and deleted as a gang.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create, delete]
# Each job's headless Service, trainer ConfigMap and (optional) checkpoint claim;
# the ConfigMap and the Service are patched when a new gang starts after a spec edit,
# and the claim it created grows to an edited storage.size.
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get, create, delete, patch]
- apiGroups: [""]
  resources: [services, configmaps]
  verbs: [get, create, delete, patch]
# Gang scheduling (spec.runPolicy.gangScheduling): a job's PodGroup, Volcano's or the
# coscheduling plugin's, created, read to tell the job's own from someone else's of the
# name, resized with its gang and deleted with the job.
- apiGroups: [scheduling.volcano.sh, scheduling.x-k8s.io]
  resources: [podgroups]
  verbs: [get, create, patch, delete]
{{- if .Values.networkPolicy.enabled }}
# Each job's NetworkPolicy (networkPolicy.enabled), created before its workers, read to
# tell the job's own from someone else's of the name, patched when a new gang starts
# after a spec edit, deleted with the job.
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, create, delete, patch]
{{- end }}
# The operator's and kopf's Events on jobs; a repeat of one of the operator's bumps its count.
- apiGroups: [""]
  resources: [events]
  verbs: [get, create, patch]
{{- end -}}
