# shellcheck shell=bash
# Shared launcher of the BAM Slurm jobs: phase1_seed.sbatch, phase2_experts.sbatch and
# phase3_mix.sbatch source it inside their batch job (it is not run on its own).
#
# Rendezvous: one Slurm task per GPU (per CPU rank without GPUs), no torchrun. This file exports
#   MASTER_ADDR  the address of the allocation's first node (its NodeAddr, which is its name
#                unless slurm.conf says otherwise), or BAM_MASTER_ADDR (e.g. that node's name on
#                a faster network)
#   MASTER_PORT  15000 + job id mod 15000 (BAM_MASTER_PORT to choose another)
# and every task of a step sets RANK=SLURM_PROCID, LOCAL_RANK=SLURM_LOCALID and
# WORLD_SIZE=SLURM_NTASKS (the step's) before exec'ing pretrain_bam.py, which starts
# torch.distributed from them (NCCL on GPUs, gloo on CPUs) and takes GPU LOCAL_RANK of its node.
#
# Resume: every phase passes --load and --save of the same directory, so a (re)started job
# continues from that directory's latest checkpoint (and starts from scratch, or from
# --pretrained-checkpoint, while there is none).
#
# Preemption: submit with --signal=B:USR1@SECONDS (the scripts do). SIGUSR1 to the batch shell
# is forwarded to srun, which forwards it to every task; pretrain_bam.py finishes its step, saves
# and exits with code 3. Exit code 3 makes this script `scontrol requeue` the job (at most
# BAM_MAX_REQUEUES times); the requeued job resumes from the checkpoint just written. SIGTERM
# (scancel, the time limit, Slurm's own preemption) also makes the training save and exit 3,
# but the job is not requeued by this script: a cancelled job stays cancelled.
#
# Logs: the job's own output (sbatch --output, %x-%j.out by default) and one file per rank and
# run: BAM_LOG_DIR/JOBNAME-JOBID/runN/rankR.log (N = SLURM_RESTART_COUNT).
#
# Containers: with BAM_CONTAINER_IMAGE set, every step runs in that image through pyxis
# (srun --container-image); the batch script itself stays on the host.
#
# Settings: environment variables, each with the default below (docs/cluster.md lists them all).
# sbatch exports the submitting shell's environment, so `BAM_TRAIN_ITERS=10 sbatch ...` works.

: "${SLURM_JOB_ID:?launch.sh runs inside a Slurm batch job: submit the .sbatch scripts with sbatch}"
: "${BAM_REPO:?the .sbatch script sets BAM_REPO before sourcing launch.sh}"

: "${BAM_RUNS:=${SLURM_SUBMIT_DIR}/runs}"          # every phase's checkpoints, under one root
[[ $BAM_RUNS == /* ]] || BAM_RUNS=$SLURM_SUBMIT_DIR/$BAM_RUNS
: "${BAM_LOG_DIR:=${BAM_RUNS}/logs}"                # per-rank logs
: "${BAM_PYTHON:=python}"                           # the interpreter the tasks run
: "${BAM_CONTAINER_IMAGE:=}"                        # pyxis image (registry#image:tag or a .sqsh file)
if [[ -z ${BAM_CONTAINER_MOUNTS:-} ]]; then         # the submit directory, and BAM_RUNS if elsewhere
    BAM_CONTAINER_MOUNTS=$SLURM_SUBMIT_DIR:$SLURM_SUBMIT_DIR
    [[ $BAM_RUNS == "$SLURM_SUBMIT_DIR"/* ]] || BAM_CONTAINER_MOUNTS+=,$BAM_RUNS:$BAM_RUNS
fi
: "${BAM_CONTAINER_WORKDIR:=${SLURM_SUBMIT_DIR}}"   # relative paths mean the same inside and out
if [[ -n $BAM_CONTAINER_IMAGE ]]; then
    : "${BAM_CODE_DIR:=/workspace/bam-megatron}"    # where the Dockerfile puts the project
else
    : "${BAM_CODE_DIR:=${BAM_REPO}}"
fi
: "${BAM_SRUN_ARGS:=}"                              # extra srun flags, e.g. --container-name=bam
: "${BAM_EXTRA_ARGS:=}"                             # extra pretrain_bam.py flags, given last
: "${BAM_MASTER_PORT:=$((15000 + SLURM_JOB_ID % 15000))}"
: "${BAM_MAX_REQUEUES:=10}"                         # requeues after preemption, per job
: "${BAM_STEP_WAIT:=120}"                           # srun --wait: seconds the other ranks get after one exits
: "${BAM_DRY_RUN:=0}"                               # 1: print the srun command lines, run nothing

# Defaults of the model, data and schedule flags (phase 1 and 3; the .sbatch sets the
# phase-specific ones - BAM_TRAIN_ITERS, BAM_LR, BAM_WARMUP - before sourcing this file).
: "${BAM_PRESET:=paper-590m}"
: "${BAM_SEQ_LENGTH:=2048}"
: "${BAM_DATA_PATH:=}"
: "${BAM_TOKENIZER:=}"
: "${BAM_MOCK_DATA:=0}"
: "${BAM_VOCAB_SIZE:=32000}"
: "${BAM_TP:=1}"
: "${BAM_PP:=1}"
: "${BAM_EP:=1}"
: "${BAM_MICRO_BATCH:=4}"
: "${BAM_GLOBAL_BATCH:=}"
: "${BAM_SAVE_INTERVAL:=1000}"
: "${BAM_LOG_INTERVAL:=10}"
: "${BAM_EVAL_INTERVAL:=1000}"
: "${BAM_EVAL_ITERS:=10}"
: "${BAM_DIST_OPT:=1}"
: "${BAM_BF16:=auto}"
: "${BAM_EXPERTS:=code law math}"
: "${BAM_SEED_DIR:=${BAM_RUNS}/seed}"
: "${BAM_EXPERTS_DIR:=${BAM_RUNS}/experts}"

BAM_EXIT_PREEMPTED=3  # pretrain_bam.py: checkpoint saved after SIGTERM/SIGUSR1
BAM_STEP_PID=""       # the running srun
BAM_FORWARD_USR1=0    # 1 while the training runs: SIGUSR1 goes on to its tasks
BAM_USR1=0            # SIGUSR1 received: requeue once the current step is done
BAM_TERMINATED=0      # SIGTERM received: never requeue
BAM_REQUEUEING=0      # scontrol requeue called: its SIGTERM is expected
BAM_REQUEUE_TERM=0    # that SIGTERM came: the job is requeued (whatever scontrol's own status)

bam_log() {
    printf '[bam %(%F %T)T] %s\n' -1 "$*" # bash's own clock: no subprocess to lose to a signal
}

bam_die() {
    bam_log "error: $*" >&2
    exit 2
}

# The address of the allocation's first node: its NodeAddr in slurm.conf (what slurmctld itself
# reaches it by; Slurm's default is the node name), or the name where scontrol does not say.
bam_first_node_addr() {
    local first addr
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    addr=$(scontrol -o show node "$first" 2>/dev/null | sed -n 's/.* NodeAddr=\([^ ]*\).*/\1/p')
    echo "${addr:-$first}"
}

# Nodes, tasks and GPUs of the allocation; MASTER_ADDR/PORT for every task.
bam_rendezvous() {
    local nodes=${SLURM_JOB_NUM_NODES:-1}
    local tasks=${SLURM_NTASKS:?sbatch did not set SLURM_NTASKS}
    local per_node=$((tasks / nodes))
    local gpus=${SLURM_GPUS_ON_NODE:-0}
    # Each task's share of the node's CPUs: srun would otherwise give (and bind) one CPU per task.
    local share=$((${SLURM_CPUS_ON_NODE:-1} / per_node))
    BAM_CPUS_PER_TASK=${BAM_CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-$((share > 0 ? share : 1))}}
    MASTER_ADDR=${BAM_MASTER_ADDR:-$(bam_first_node_addr)}
    export MASTER_ADDR MASTER_PORT=$BAM_MASTER_PORT
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}} PYTHONUNBUFFERED=1
    if ((gpus > 0 && per_node > gpus)); then
        bam_die "$per_node tasks per node but $gpus GPUs per node: run one task per GPU (--ntasks-per-node)"
    elif ((gpus > 0 && per_node < gpus)); then
        bam_log "warning: $per_node tasks per node leave $((gpus - per_node)) of $gpus GPUs idle"
    fi
    bam_log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-}) run ${SLURM_RESTART_COUNT:-0}: $nodes node(s) x $per_node task(s)," \
        "$gpus GPU(s) per node, $BAM_CPUS_PER_TASK CPU(s) per task, world size $tasks, rendezvous $MASTER_ADDR:$MASTER_PORT"
}

# Directory of this job's per-rank logs (one subdirectory per run of a requeued job).
bam_job_log_dir() {
    local id=$SLURM_JOB_ID
    if [[ -n ${SLURM_ARRAY_JOB_ID:-} ]]; then
        id=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
    fi
    echo "${BAM_LOG_DIR}/${SLURM_JOB_NAME:-bam}-${id}/run${SLURM_RESTART_COUNT:-0}"
}

# The latest checkpointed iteration under a --save directory, or "none".
bam_latest() {
    local file=$1/latest_checkpointed_iteration.txt
    if [[ -f $file ]]; then cat "$file"; else echo none; fi
}

_bam_on_usr1() {
    BAM_USR1=1
    if ((BAM_FORWARD_USR1)) && [[ -n $BAM_STEP_PID ]]; then
        bam_log "SIGUSR1: asking the training to save and stop (the job is then requeued)"
        kill -USR1 "$BAM_STEP_PID" 2>/dev/null || true # srun forwards it to every task
    else
        bam_log "SIGUSR1: the job is requeued once the current step is done"
    fi
}

_bam_on_term() {
    # Slurm signals the tasks itself (they save and exit 3 within KillWait); srun must not get
    # another SIGTERM, which would make it SIGKILL them.
    if ((BAM_REQUEUEING)); then
        BAM_REQUEUE_TERM=1
        return # our own requeue ends this run
    fi
    BAM_TERMINATED=1
    bam_log "SIGTERM: the job is cancelled or out of time; the training saves, no requeue"
}

trap _bam_on_usr1 USR1
trap _bam_on_term TERM

# Run one job step: bam_step LOG_NAME [srun flags...] -- COMMAND [ARGS...]
# Every task gets RANK/LOCAL_RANK from Slurm; its output goes to LOG_NAME in the job's log
# directory (%t in LOG_NAME is the task id). Returns the step's exit code.
# shellcheck disable=SC2016  # the task command is expanded by each task's shell
bam_step() {
    local log_dir
    log_dir=$(bam_job_log_dir)
    mkdir -p "$log_dir"
    local log=$log_dir/$1
    shift
    local cmd=(srun --output="$log" --error="$log" --wait="$BAM_STEP_WAIT")
    while [[ $1 != -- ]]; do
        cmd+=("$1")
        shift
    done
    shift
    cmd+=(--cpus-per-task="$BAM_CPUS_PER_TASK") # srun does not inherit sbatch's
    if [[ -n $BAM_CONTAINER_IMAGE ]]; then
        cmd+=(--container-image="$BAM_CONTAINER_IMAGE" --container-mounts="$BAM_CONTAINER_MOUNTS"
            --container-workdir="$BAM_CONTAINER_WORKDIR")
    fi
    local extra=()
    read -r -a extra <<<"$BAM_SRUN_ARGS"
    cmd+=("${extra[@]}")
    # Each task's shell (not this one) expands $task; it first names its rank and node in its log.
    local task='export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS'
    task+='; echo "[bam] rank $RANK of $WORLD_SIZE (local rank $LOCAL_RANK) on node ${SLURMD_NODENAME:-$HOSTNAME}"'
    task+='; exec "$@"'
    cmd+=(bash -c "$task" bam-task "$@")
    bam_log "step (log ${log//%t/R}): ${cmd[*]@Q}"
    if [[ $BAM_DRY_RUN == 1 ]]; then
        return 0
    fi
    "${cmd[@]}" &
    BAM_STEP_PID=$!
    local rc=0
    wait "$BAM_STEP_PID" || rc=$?
    # A trapped signal interrupts `wait` (status > 128) while srun runs on: wait again, until
    # `wait` says srun was already waited for (127), i.e. the status in hand is srun's own.
    while ((rc > 128)); do
        local again=0
        wait "$BAM_STEP_PID" 2>/dev/null || again=$?
        ((again != 127)) || break
        rc=$again
    done
    BAM_STEP_PID=""
    return "$rc"
}

# Put the job back in the queue (it resumes from its latest checkpoint) and end this run; exit 3
# without requeueing after SIGTERM or BAM_MAX_REQUEUES requeues.
bam_requeue() {
    local restarts=${SLURM_RESTART_COUNT:-0}
    if ((BAM_TERMINATED)); then
        bam_log "stopped by SIGTERM: not requeued (resubmit to resume)"
    elif ((restarts >= BAM_MAX_REQUEUES)); then
        bam_log "requeued $restarts times already (BAM_MAX_REQUEUES=$BAM_MAX_REQUEUES): not requeued"
    else
        BAM_REQUEUEING=1
        # Said first: the requeue ends this run at once and can do so before scontrol returns (the
        # batch shell is gone soon after its SIGTERM; scontrol itself may die of that SIGTERM).
        bam_log "requeueing job $SLURM_JOB_ID (restart $((restarts + 1))): it resumes from the latest checkpoint"
        if scontrol requeue "$SLURM_JOB_ID" || ((BAM_REQUEUE_TERM)); then
            exit 0
        fi
        BAM_REQUEUEING=0
        bam_log "scontrol requeue failed: resubmit to resume"
    fi
    exit "$BAM_EXIT_PREEMPTED"
}

# Run pretrain_bam.py on every task with the given flags (then BAM_EXTRA_ARGS); on exit code 3
# (preempted, checkpoint saved) requeue the job. Exits the batch script with the training's code.
bam_train() {
    local extra=()
    read -r -a extra <<<"$BAM_EXTRA_ARGS"
    if ((BAM_USR1)); then
        bam_log "preemption signalled before the training started"
        bam_requeue
    fi
    local rc=0
    BAM_FORWARD_USR1=1
    bam_step "rank%t.log" -- "$BAM_PYTHON" "$BAM_CODE_DIR/pretrain_bam.py" "$@" "${extra[@]}" || rc=$?
    BAM_FORWARD_USR1=0
    bam_log "pretrain_bam.py exited with code $rc (rank logs: $(bam_job_log_dir))"
    if ((rc == BAM_EXIT_PREEMPTED)); then
        bam_log "preempted: checkpoint saved"
        bam_requeue
    elif ((rc > 128 && BAM_USR1)); then
        bam_log "SIGUSR1 arrived while srun was starting: requeued to resume from the last checkpoint"
        bam_requeue
    fi
    exit "$rc"
}

# Flags shared by phases 1 and 3 (phase 2 inherits them from the seed through phase2.args).
bam_common_flags() {
    local data=()
    if [[ $BAM_MOCK_DATA == 1 ]]; then
        data=(--mock-data --vocab-size "$BAM_VOCAB_SIZE")
    else
        [[ -n $BAM_DATA_PATH ]] || bam_die "set BAM_DATA_PATH (\"W1 PREFIX1 W2 PREFIX2 ...\") or BAM_MOCK_DATA=1"
        [[ -n $BAM_TOKENIZER ]] || bam_die "set BAM_TOKENIZER (a SentencePiece .model)"
        local prefixes=()
        read -r -a prefixes <<<"$BAM_DATA_PATH" # weights and prefixes; paths without spaces
        data=(--data-path "${prefixes[@]}" --tokenizer-model "$BAM_TOKENIZER")
    fi
    # Training flags only: the architecture is the seed's (phase 1 adds it) or the checkpoint's.
    BAM_FLAGS=("${data[@]}"
        --tensor-model-parallel-size "$BAM_TP" --pipeline-model-parallel-size "$BAM_PP"
        --micro-batch-size "$BAM_MICRO_BATCH" --train-iters "$BAM_TRAIN_ITERS"
        --lr "$BAM_LR" --lr-warmup-iters "$BAM_WARMUP" --save-interval "$BAM_SAVE_INTERVAL"
        --log-interval "$BAM_LOG_INTERVAL" --eval-interval "$BAM_EVAL_INTERVAL" --eval-iters "$BAM_EVAL_ITERS")
    if [[ -n $BAM_GLOBAL_BATCH ]]; then
        BAM_FLAGS+=(--global-batch-size "$BAM_GLOBAL_BATCH")
    fi
    if ((BAM_TP > 1)); then
        BAM_FLAGS+=(--sequence-parallel)
    fi
    if [[ $BAM_DIST_OPT == 1 ]]; then
        BAM_FLAGS+=(--use-distributed-optimizer)
    fi
    if [[ $BAM_BF16 == 1 || ($BAM_BF16 == auto && ${SLURM_GPUS_ON_NODE:-0} -gt 0) ]]; then
        BAM_FLAGS+=(--bf16)
    fi
}

mkdir -p "$BAM_RUNS" "$BAM_LOG_DIR"
bam_rendezvous
