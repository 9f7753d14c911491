#!/usr/bin/env bash
# JobSet manifests for GKE, from the same env file as the other gcp/ scripts: a multi-host
# Cloud TPU slice, or multi-node H100/H200 GPUs; rendered, applied, watched, deleted.
set -euo pipefail
# shellcheck source=SCRIPTDIR/../lib/tpu.sh
source "$(dirname "$0")/../lib/tpu.sh"

usage() {
  cat <<USAGE
usage: gcp/gke/jobset.sh [--env FILE] [--dry-run] render|apply|status|delete [tpu|gpu]

Runs the trainer on GKE as a JobSet (https://jobset.sigs.k8s.io): one pod per host, each
cloning REPO_URL at REPO_COMMIT into IMAGE, installing the project, running the memory
preflight (python -m train.aot CONFIG, unless PREFLIGHT=false) and then
\`python -m train CONFIG workdir=WORKDIR [DATA] distributed=on TRAIN_ARGS\`. Checkpoints go to
WORKDIR (gs://); a restarted JobSet (failurePolicy.maxRestarts = MAX_RECREATES, e.g. after a
spot preemption) resumes from the newest one.

  render   print the manifest (YAML) on stdout
  apply    write it to logs/gke/NAME.yaml, fetch the cluster's credentials, kubectl apply it
  status   kubectl get the JobSet and its pods
  delete   kubectl delete the JobSet (the checkpoints stay in the bucket)
  tpu      a multi-host TPU slice of ACCELERATOR_TYPE (default; or GKE_KIND=gpu)
  gpu      GKE_GPU_NODES nodes of GKE_GPUS_PER_NODE GPUs, one process per node

Settings (gcp/env), besides PROJECT, BUCKET/WORKDIR, RUN_NAME (the JobSet's name), CONFIG,
DATA_PATHS, TRAIN_ARGS, REPO_URL, REPO_COMMIT, CAPACITY (spot: spot nodes), MAX_RECREATES:
  GKE_CLUSTER, GKE_LOCATION  the cluster and its zone or region (default ZONE) for apply
  GKE_NAMESPACE              default default
  GKE_SERVICE_ACCOUNT        the Kubernetes service account that may use BUCKET through
                             Workload Identity (default default)
  IMAGE                      default python:3.11 (any image with git and Python 3.11+)
  TPU: ACCELERATOR_TYPE (v5p-32), TPU_TOPOLOGY (default from the type, e.g. 2x2x4),
       JAX_INSTALL (default jax[tpu])
  GPU: GKE_GPU_NODES (default 2), GKE_GPUS_PER_NODE (default 8), GKE_GPU_ACCELERATOR
       (default nvidia-h100-80gb; nvidia-h200-141gb for H200), GKE_GPU_CONFIG (default
       configs/gemma2_2b.yaml), GPU_JAX_INSTALL (default jax[cuda12]), COORDINATOR_PORT
       (default 1234)
$(common_flags_help)
USAGE
}

parse_common_args "$@"
((${#ARGS[@]} >= 1 && ${#ARGS[@]} <= 2)) || die "expected render, apply, status or delete (see --help)"
ACTION=${ARGS[0]}
case $ACTION in
  render | apply | status | delete) ;;
  *) die "unknown action '$ACTION' (see --help)" ;;
esac
load_env
KIND=${ARGS[1]:-${GKE_KIND:-tpu}}
case $KIND in
  tpu | gpu) ;;
  *) die "the kind must be tpu or gpu, not '$KIND'" ;;
esac
if [[ $KIND == gpu ]]; then
  CONFIG=${GKE_GPU_CONFIG:-configs/gemma2_2b.yaml}
  # shellcheck disable=SC2034 # read by setup_command (lib/remote.sh, sourced by lib/tpu.sh)
  JAX_INSTALL=${GPU_JAX_INSTALL:-jax[cuda12]}
fi
: "${GKE_NAMESPACE:=default}"
: "${GKE_SERVICE_ACCOUNT:=default}"
: "${GKE_LOCATION:=${ZONE:-}}"
: "${IMAGE:=python:3.11}"
: "${GKE_GPU_NODES:=2}"
: "${GKE_GPUS_PER_NODE:=8}"
: "${GKE_GPU_ACCELERATOR:=nvidia-h100-80gb}"
: "${COORDINATOR_PORT:=1234}"
NAME=$RUN_NAME
[[ $NAME =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ && ${#NAME} -le 40 ]] ||
  die "RUN_NAME=$NAME names the JobSet: lowercase letters, digits and '-', at most 40"

# json_string TEXT: TEXT as a JSON (so also YAML) string literal.
json_string() {
  local text=$1
  text=${text//\\/\\\\}
  text=${text//\"/\\\"}
  printf '"%s"' "$text"
}

# tpu_selector: the GKE node label value of ACCELERATOR_TYPE's TPU generation.
tpu_selector() {
  case ${ACCELERATOR_TYPE%-*} in
    v4) echo tpu-v4-podslice ;;
    v5p) echo tpu-v5p-slice ;;
    v5litepod | v5e) echo tpu-v5-lite-podslice ;;
    v6e) echo tpu-v6e-slice ;;
    *) die "no GKE TPU type for ACCELERATOR_TYPE=$ACCELERATOR_TYPE" ;;
  esac
}

# tpu_chips: the chips of ACCELERATOR_TYPE (v4 and v5p count TensorCores, 2 per chip).
tpu_chips() {
  local size=${ACCELERATOR_TYPE##*-}
  case ${ACCELERATOR_TYPE%-*} in
    v4 | v5p) echo $((size / 2)) ;;
    *) echo "$size" ;;
  esac
}

# tpu_topology: TPU_TOPOLOGY, else the usual topology of the slice's chip count.
tpu_topology() {
  if [[ -n ${TPU_TOPOLOGY:-} ]]; then
    echo "$TPU_TOPOLOGY"
    return
  fi
  local chips
  chips=$(tpu_chips)
  case ${ACCELERATOR_TYPE%-*}:$chips in
    v4:4 | v5p:4) echo 2x2x1 ;;
    v4:8 | v5p:8) echo 2x2x2 ;;
    v4:16 | v5p:16) echo 2x2x4 ;;
    v4:32 | v5p:32) echo 2x4x4 ;;
    v4:64 | v5p:64) echo 4x4x4 ;;
    v4:128 | v5p:128) echo 4x4x8 ;;
    v4:256 | v5p:256) echo 4x8x8 ;;
    v4:512 | v5p:512) echo 8x8x8 ;;
    *:4) echo 2x2 ;;
    *:8) echo 2x4 ;;
    *:16) echo 4x4 ;;
    *:32) echo 4x8 ;;
    *:64) echo 8x8 ;;
    *:128) echo 8x16 ;;
    *:256) echo 16x16 ;;
    *) die "no usual topology for ACCELERATOR_TYPE=$ACCELERATOR_TYPE; set TPU_TOPOLOGY" ;;
  esac
}

# pod_command: what each pod runs: set up the project, the preflight, the trainer.
pod_command() {
  local words=() preflight=()
  mapfile -t words < <(trainer_args distributed=on)
  mapfile -t preflight < <(preflight_args)
  local text
  text="mkdir -p /workspace; cd /workspace; $(setup_command);"
  if [[ $PREFLIGHT == true ]]; then
    text+=" $(quote python -m train.aot "${preflight[@]}");"
  fi
  text+=" exec $(quote python -m train "${words[@]}")"
  echo "$text"
}

spot_selector() {
  if [[ $CAPACITY == spot ]]; then
    echo "                cloud.google.com/gke-spot: \"true\""
  fi
}

# exclusive_annotation: a TPU slice's pods all go to one node pool (the slice), alone.
exclusive_annotation() {
  if [[ $KIND == tpu ]]; then
    echo "  annotations:"
    echo "    alpha.jobset.sigs.k8s.io/exclusive-topology: cloud.google.com/gke-nodepool"
  fi
}

# manifest_header REPLICATED_JOB_NAME PODS: the JobSet down to the pod spec's restartPolicy.
manifest_header() {
  cat <<YAML
apiVersion: jobset.x-k8s.io/v1alpha2
kind: JobSet
metadata:
  name: $NAME
  namespace: $GKE_NAMESPACE
  labels:
    app.kubernetes.io/name: cce-jax-train
$(exclusive_annotation)
spec:
  network:
    enableDNSHostnames: true
  failurePolicy:
    maxRestarts: $MAX_RECREATES
  replicatedJobs:
    - name: $1
      replicas: 1
      template:
        spec:
          parallelism: $2
          completions: $2
          completionMode: Indexed
          backoffLimit: 0
          template:
            spec:
              restartPolicy: Never
              serviceAccountName: $GKE_SERVICE_ACCOUNT
YAML
}

tpu_manifest() {
  local hosts chips per_host selector topology command
  hosts=$WORKERS
  chips=$(tpu_chips)
  selector=$(tpu_selector)
  topology=$(tpu_topology)
  command=$(json_string "$(pod_command)")
  ((chips % hosts == 0)) || die "ACCELERATOR_TYPE=$ACCELERATOR_TYPE: $chips chips do not split over $hosts hosts"
  per_host=$((chips / hosts))
  manifest_header slice "$hosts"
  cat <<YAML
              nodeSelector:
                cloud.google.com/gke-tpu-accelerator: $selector
                cloud.google.com/gke-tpu-topology: $topology
$(spot_selector)
              containers:
                - name: trainer
                  image: $IMAGE
                  command: ["bash", "-c", $command]
                  ports:
                    - containerPort: 8471
                    - containerPort: 8080
                  resources:
                    requests:
                      google.com/tpu: $per_host
                    limits:
                      google.com/tpu: $per_host
YAML
}

gpu_manifest() {
  local command
  command=$(json_string "$(pod_command)")
  [[ $GKE_GPU_NODES =~ ^[1-9][0-9]*$ ]] || die "GKE_GPU_NODES must be a positive whole number, not '$GKE_GPU_NODES'"
  [[ $GKE_GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "GKE_GPUS_PER_NODE must be a positive whole number, not '$GKE_GPUS_PER_NODE'"
  manifest_header workers "$GKE_GPU_NODES"
  cat <<YAML
              nodeSelector:
                cloud.google.com/gke-accelerator: $GKE_GPU_ACCELERATOR
$(spot_selector)
              containers:
                - name: trainer
                  image: $IMAGE
                  command: ["bash", "-c", $command]
                  env:
                    - name: JAX_COORDINATOR_ADDRESS
                      value: "$NAME-workers-0-0.$NAME:$COORDINATOR_PORT"
                    - name: JAX_NUM_PROCESSES
                      value: "$GKE_GPU_NODES"
                    - name: JAX_PROCESS_ID
                      valueFrom:
                        fieldRef:
                          fieldPath: metadata.annotations['batch.kubernetes.io/job-completion-index']
                  ports:
                    - containerPort: $COORDINATOR_PORT
                  resources:
                    limits:
                      nvidia.com/gpu: $GKE_GPUS_PER_NODE
                  volumeMounts:
                    - name: dshm
                      mountPath: /dev/shm
              volumes:
                - name: dshm
                  emptyDir:
                    medium: Memory
YAML
}

# manifest: the JobSet of KIND (blank lines, from an empty spot selector, left out).
manifest() {
  require CONFIG REPO_URL REPO_COMMIT
  require_remote_repo
  require_workdir
  if [[ $KIND == tpu ]]; then
    require_slice
    tpu_manifest | grep -v '^$'
  else
    gpu_manifest | grep -v '^$'
  fi
}

kubectl_flags() {
  echo "--namespace=$GKE_NAMESPACE"
}

credentials() {
  run gcloud container clusters get-credentials "$GKE_CLUSTER" "--location=$GKE_LOCATION" \
    "--project=$PROJECT"
}

[[ $ACTION == render ]] || require PROJECT GKE_CLUSTER GKE_LOCATION
case $ACTION in
  render) manifest ;;
  apply)
    text=$(manifest)
    file=logs/gke/$NAME.yaml
    mkdir -p logs/gke
    printf '%s\n' "$text" >"$file"
    note "wrote the $KIND JobSet to $file"
    credentials
    run kubectl apply "$(kubectl_flags)" -f "$file"
    ;;
  status)
    credentials
    run kubectl get jobset "$NAME" "$(kubectl_flags)"
    run kubectl get pods "$(kubectl_flags)" "--selector=jobset.sigs.k8s.io/jobset-name=$NAME"
    ;;
  delete)
    credentials
    run kubectl delete jobset "$NAME" "$(kubectl_flags)"
    ;;
esac
