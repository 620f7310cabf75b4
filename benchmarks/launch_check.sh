#!/usr/bin/env bash
# launch/slurm.sbatch run for real on a local Slurm (launch/local-slurm.sh, two nodes on this
# machine): harvest jobs on 1 node x 2 CPU processes and on 2 nodes x 1 process (a two-machine
# rendezvous) and a training job, each through accelerate's launcher, checked against a one-process
# harvest (same rows, byte for byte) and a torchrun training run (same weights, bit for bit), plus
# a job that must fail (a bad config key) and be reported as failed.
# Hardware: one Linux machine, 2+ cores, root (slurmd runs jobs as root here), Slurm and munge
#   installed (bash launch/local-slurm.sh install). No GPU, no network.
# Time: ~2 min on 2 cores (jobs: harvests ~20 s each, train ~15 s, failing ~5 s, mostly start-up;
#   the one-process harvest and torchrun references ~40 s; starting the cluster <1 s).
# Run:  . VENV/bin/activate && bash benchmarks/launch_check.sh      (exit 0: every check passed)
# It starts the local cluster (2 nodes) if none is running and stops it at the end, works in a
# temporary directory, and prints each job's squeue line, scontrol record, jobcomp line and log.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export SLURM_LOCAL_DIR=${SLURM_LOCAL_DIR:-/tmp/saeworks-slurm}
export SLURM_CONF=$SLURM_LOCAL_DIR/slurm.conf
T0=$SECONDS
fail() { echo "launch_check: FAILED: $*" >&2; exit 1; }
command -v sbatch >/dev/null || fail "no Slurm here: bash launch/local-slurm.sh install (root)"
command -v accelerate >/dev/null || fail "no accelerate on PATH: activate the saeworks environment"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/launch-check.XXXXXX")
STARTED=""
cleanup() {
  rm -rf "$WORK"
  if [ -n "$STARTED" ]; then bash launch/local-slurm.sh stop; fi
}
trap cleanup EXIT
if [[ $(bash launch/local-slurm.sh status) != *"slurmctld: running"* ]]; then
  SLURM_LOCAL_NODES=2 bash launch/local-slurm.sh start
  STARTED=1
fi
NODES=$(sinfo -h -o %D)

HARVEST=("harvest.hooks=[blocks.2.hook_resid_post]" harvest.max_tokens=1024 harvest.batch_size=4
  harvest.chunk_tokens=128 harvest.chunks_per_shard=2 data.context_size=64 model.device=cpu
  model.dtype=float32)
TRAIN=(train.store="$WORK/one/activations.zarr" "train.saes=[{k: 8, d_sae: 256}]" train.total_tokens=768
  train.batch_size=128 train.init_sample_rows=256 train.device=cpu train.wandb=false train.autocast=none
  train.reader.buffer_chunks=4 train.lr_warmup_tokens=0 train.dead_after_tokens=100000
  train.checkpoint_every_tokens=null model.device=cpu)

# submit NAME NODES CPUS_PER_NODE [script arguments]: runs the job on CPUs only, waits, prints its
# records and log, sets JOB, STATE and LOG.
submit() {
  local name=$1 nodes=$2 cpus=$3; shift 3
  JOB=$(sbatch --parsable --job-name "$name" --nodes "$nodes" --ntasks-per-node 1 \
    --cpus-per-task "$cpus" --gpus-per-node=0 --output "$WORK/$name-%j.out" launch/slurm.sbatch "$@")
  LOG=$WORK/$name-$JOB.out
  local shown="" t=$SECONDS
  while squeue -h -j "$JOB" 2>/dev/null | grep -q .; do
    if [ -z "$shown" ] && squeue -h -j "$JOB" -o %T | grep -q RUNNING; then
      echo "--- squeue while job $JOB ($name) runs:"; squeue -j "$JOB"; squeue -s -j "$JOB"; shown=1
    fi
    [ $((SECONDS - t)) -lt 600 ] || { scancel "$JOB"; fail "job $JOB ($name) ran past 600 s"; }
    sleep 1
  done
  echo "--- job $JOB ($name) after $((SECONDS - t)) s:"
  scontrol show job "$JOB" | grep -E "JobState|RunTime|NodeList=|NumCPUs|Command"
  grep "JobId=$JOB " "$SLURM_LOCAL_DIR/jobcomp.log"
  echo "--- its log (progress bars left out):"
  grep -v -E "Loading weights|shards:|tok/s" "$LOG" || true
  STATE=$(scontrol show job "$JOB" | grep -o -E "JobState=[A-Z]+ |ExitCode=[0-9]+:[0-9]+" \
    | tr -d ' ' | paste -sd ' ')
}

# ranks_in_log NODES PROCS STAGE: the job's log says NODES x PROCS, and each rank harvested its half.
ranks_in_log() {
  grep -q "$1 node(s) x $2 process(es), 0 GPU(s) per node, stage $3" "$LOG" \
    || fail "job $JOB was not $1 node(s) x $2 CPU process(es)"
  if [ "$3" = activations ]; then
    grep -q "rank 0/2 harvested shards \[0, 2\]" "$LOG" || fail "rank 0/2 did not harvest shards 0 and 2"
    grep -q "rank 1/2 harvested shards \[1, 3\]" "$LOG" || fail "rank 1/2 did not harvest shards 1 and 3"
  fi
}

# same_store RUN_DIR: its store verifies and equals the one-process store, array by array.
same_store() {
  python -m saeworks verify "$1/activations.zarr" 2>/dev/null
  python - "$WORK/one/activations.zarr" "$1/activations.zarr" <<'EOF'
import sys
import numpy as np
import zarr
one, two = (zarr.open_group(p, mode="r") for p in sys.argv[1:])
arrays_one, arrays_two = dict(one.arrays()), dict(two.arrays())
assert sorted(arrays_one) == sorted(arrays_two), (sorted(arrays_one), sorted(arrays_two))
for name, array in sorted(arrays_one.items()):
    same = np.array_equal(array[:], arrays_two[name][:])
    print(f"  {name:26s} {str(array.shape):12s} {array.dtype}: {'equal' if same else 'DIFFERENT'}")
    assert same, name
assert dict(one.attrs) == dict(two.attrs), "store attributes differ"
assert two.attrs["complete"] and two.attrs["n_tokens_complete"] == 1024
print("  the Slurm job's store equals the 1-process store (arrays, checksums, attributes)")
EOF
}

echo "=== 1. harvest: one process (reference), then sbatch on 1 node x 2 CPU processes"
python -m saeworks harvest configs/demo.yaml run_dir="$WORK/one" "${HARVEST[@]}" >"$WORK/one.log" 2>&1 \
  || { tail "$WORK/one.log"; fail "the one-process harvest"; }
submit harvest 1 2 configs/demo.yaml run_dir="$WORK/slurm" "${HARVEST[@]}"
[ "$STATE" = "JobState=COMPLETED ExitCode=0:0" ] || fail "harvest job $JOB: $STATE"
ranks_in_log 1 2 activations
same_store "$WORK/slurm"

if [ "$NODES" -ge 2 ]; then
  echo "=== 2. harvest: sbatch --nodes 2, 1 CPU process each (a two-machine rendezvous)"
  submit harvest2 2 1 configs/demo.yaml run_dir="$WORK/slurm2" "${HARVEST[@]}"
  [ "$STATE" = "JobState=COMPLETED ExitCode=0:0" ] || fail "2-node harvest job $JOB: $STATE"
  ranks_in_log 2 1 activations
  same_store "$WORK/slurm2"
else
  echo "=== 2. skipped: the running local cluster has $NODES node (SLURM_LOCAL_NODES=2 makes two)"
fi

echo "=== 3. training: torchrun with 2 processes (reference), then STAGE=train sbatch"
python -m torch.distributed.run --standalone --nproc-per-node 2 -m saeworks.train configs/demo.yaml \
  run_dir="$WORK/torchrun" "${TRAIN[@]}" >"$WORK/torchrun.log" 2>&1 \
  || { tail "$WORK/torchrun.log"; fail "the torchrun training run"; }
STAGE=train submit train 1 2 configs/demo.yaml run_dir="$WORK/slurm-train" "${TRAIN[@]}"
[ "$STATE" = "JobState=COMPLETED ExitCode=0:0" ] || fail "train job $JOB: $STATE"
ranks_in_log 1 2 train
python - "$WORK/torchrun" "$WORK/slurm-train" <<'EOF'
import glob, json, sys
from safetensors.torch import load_file
want, got = (load_file(f"{d}/saes/topk-k8-256/sae_weights.safetensors") for d in sys.argv[1:])
for key in sorted(want):
    assert want[key].shape == got[key].shape and bool((want[key] == got[key]).all()), key
    print(f"  {key:6s} {tuple(want[key].shape)}: bitwise equal to torchrun's")
state = json.load(open(glob.glob(f"{sys.argv[2]}/checkpoints/*/state.json")[0]))
assert state["fingerprint"]["world_size"] == 2 and len(state["ranks"]) == 2 and state["tokens"] == 768
print("  checkpoint: world_size 2, 2 ranks' reader states, 768 tokens")
EOF

echo "=== 4. a job that must fail: an unknown config key"
submit bad 1 2 configs/demo.yaml run_dir="$WORK/bad" harvest.no_such_key=1 model.device=cpu
case $STATE in
  "JobState=FAILED ExitCode=0:0"|"JobState=COMPLETED"*) fail "bad job $JOB was not reported failed: $STATE" ;;
  JobState=FAILED*) ;;
  *) fail "bad job $JOB: $STATE" ;;
esac
grep -q "unknown config field 'harvest.no_such_key'" "$LOG" || fail "the bad job's error is not in its log"

echo "=== sacct (no accounting database here, see launch/local-slurm.sh):"
sacct -j "$JOB" 2>&1 || true
echo "launch_check: PASS in $((SECONDS - T0)) s"
