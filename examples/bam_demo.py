"""The whole Branch-Attend-Mix method on a CPU, end to end, with the project's real tools.

    python examples/bam_demo.py [--workdir runs/demo] [--fresh] [--quick]

Stages (each a subprocess of the project's own entry points; everything goes under --workdir):

 1. data        four domains of text found on the machine (bam_megatron/demo_data.py): general
                prose (Python's documentation), code (the standard library), law (license texts),
                math (synthetic worked solutions: a stock machine has no math text)
 2. tokenizer   tools/train_tokenizer.py: one SentencePiece model for all domains
 3. preprocess  tools/preprocess_data.py: JSONL -> indexed datasets, one per domain
 4. seed        pretrain_bam.py --variant dense on an equal mixture of the four domains (2 ranks)
 5. branch      tools/branch.py: three copies of the seed (code, law, math) with phase-2 flags
 6. experts     pretrain_bam.py @phase2.args: each copy continues on 90% its domain, 10% general,
                at half the seed's LR
 7. upcycle     tools/upcycle.py --method bam and --method btx: seed + 3 experts -> 4-expert MoEs
 8. mixtures    pretrain_bam.py --variant bam / btx on the equal mixture (same data, steps and LR)
 9. evaluate    tools/eval.py: per-domain perplexity of all six models, routing heatmaps

A stage is skipped when its outputs exist and were made with the same settings from the same
inputs (stamps under WORKDIR/.stages), so a demo that was interrupted continues where it stopped:
each stage writes under a temporary name and renames it once it succeeded (tools/branch.py and
tools/upcycle.py publish atomically themselves). Full logs go to WORKDIR/logs/; a failing stage
stops the demo with a message naming the stage and its log.

At the end the demo prints the perplexity table, checks what the method promises even at this
scale (each domain expert beats the seed on its own domain; BTX and BAM beat the seed on average)
and says where the routing heatmaps are. --quick runs a few iterations per phase (a smoke test of
the pipeline in a few minutes; its numbers mean little).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOMAINS = ("general", "code", "law", "math")
EXPERTS = ("code", "law", "math")  # the seed is the fourth expert (the generalist)
MIXTURES = ("btx", "bam")
STAGES = 9


@dataclass(frozen=True)
class Settings:
    """Sizes and schedules. The full demo took 9-11 minutes on 2 CPU cores shared with other jobs
    (--quick: about 2 minutes); every run gave the same table (training is deterministic)."""

    domain_bytes: int = 400_000  # of text per domain
    vocab_size: int = 1536
    num_layers: int = 2
    hidden_size: int = 128
    ffn_hidden_size: int = 384
    num_attention_heads: int = 4
    seq_length: int = 128
    micro_batch_size: int = 8  # x 2 data-parallel ranks
    split: str = "94,5,1"  # train, valid (evaluated), test (held out) documents of every domain
    seed_iters: int = 1200
    seed_lr: float = 3e-3
    warmup_iters: int = 50
    expert_iters: int = 500  # LR: tools/branch.py's, half the seed's
    mix_iters: int = 500
    mix_lr: float = 1e-3
    eval_iters: int = 4  # validation batches per domain at the end of each training run
    eval_samples: Optional[int] = None  # final evaluation, per domain: None = the whole valid split
    log_lines: int = 5  # iteration lines shown per training run (about)


QUICK = dict(seed_iters=30, expert_iters=10, mix_iters=10, warmup_iters=3, eval_iters=1, eval_samples=16, log_lines=2)


class StageFailed(RuntimeError):
    """A stage's command failed: names the stage and its log."""


# ---------------------------------------------------------------------------------------------
# output


def _fmt(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


class Console:
    """Lines stamped with the time since the stage started; one lock for parallel jobs."""

    def __init__(self) -> None:
        self.start = self.stage_start = time.perf_counter()
        self.lock = threading.Lock()

    def header(self, number: int, title: str) -> None:
        self.stage_start = time.perf_counter()
        with self.lock:
            print(f"\n=== [{number}/{STAGES}] {title}   (at {_fmt(self.stage_start - self.start)})", flush=True)

    def line(self, text: str) -> None:
        with self.lock:
            print(f"  [{time.perf_counter() - self.stage_start:6.1f}s] {text}", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.stage_start


_ITERATION = re.compile(r"^\s*iteration\s+(\d+)/\s*(\d+)")
_FIELD = re.compile(r"(lm loss|load_balancing_loss|tokens/s|elapsed time per iteration \(ms\)):\s*([-+.\dEe]+)")
_WARNING = re.compile(r"^\S+:\d+: \w*Warning: ")  # Python's warning line; its source line follows, indented
_NOISE = re.compile(r"torch/distributed/run\.py|^\*+$|^\s*$")
_ERROR = re.compile(r"^\S+: error: ")  # the project's tools fail with one such line
_EXCEPTION = re.compile(r"^(?!.*ChildFailedError)[\w.]*(Error|Exception)\b.*: ")  # a Python traceback's last line


def _diagnosis(lines: Sequence[str]) -> list[str]:
    """The lines of a failed command's output that say why: its error line, else the exceptions."""
    errors = [line for line in lines if _ERROR.search(line)]
    return errors[-3:] or [line for line in lines if _EXCEPTION.search(line)][-3:]


class OutputFilter:
    """Which lines of a tool's output the demo shows (the log keeps all of them)."""

    def __init__(self) -> None:
        self.in_warning = False

    def __call__(self, line: str) -> Optional[str]:
        if _WARNING.match(line):
            self.in_warning = True
            return None
        if self.in_warning and line.startswith((" ", "\t")):
            return None
        self.in_warning = False
        if _NOISE.search(line):
            return None
        return self.show(line.rstrip())

    def show(self, line: str) -> Optional[str]:
        return line


class TrainingFilter(OutputFilter):
    """pretrain_bam.py: every ``every``-th iteration line (condensed), validation, checkpoints, errors."""

    def __init__(self, every: int) -> None:
        super().__init__()
        self.every = every

    def show(self, line: str) -> Optional[str]:
        m = _ITERATION.match(line)
        if m:
            it, total = int(m.group(1)), int(m.group(2))
            if it % self.every and it != total:
                return None
            fields = dict(_FIELD.findall(line))
            text = f"iteration {it:4d}/{total} | lm loss {float(fields.get('lm loss', 'nan')):.4f}"
            if "load_balancing_loss" in fields:
                text += f" | load balancing {float(fields['load_balancing_loss']):.3f}"
            if "elapsed time per iteration (ms)" in fields:
                text += f" | {float(fields['elapsed time per iteration (ms)']):.0f} ms/it"
            if "tokens/s" in fields:
                text += f" | {float(fields['tokens/s']):.0f} tokens/s"
            return text
        if (
            re.match(r"\s*(validation at|saved checkpoint|loaded|no checkpoint)", line)
            or re.search(r" model: [\d,]+ parameters", line)
            or _ERROR.search(line)
        ):
            return line.strip()
        return None


class EvalFilter(OutputFilter):
    """tools/eval.py: progress lines; the table is printed at the end of the demo."""

    def show(self, line: str) -> Optional[str]:
        return None if line.startswith(("|", "wrote", "routing heatmaps")) else line


class PrefixFilter(OutputFilter):
    """Only lines that start with one of ``prefixes`` (and errors)."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def show(self, line: str) -> Optional[str]:
        return line if line.startswith(self.prefixes) or _ERROR.search(line) else None


# ---------------------------------------------------------------------------------------------
# running the tools


@dataclass
class Job:
    """One subprocess: its output goes to ``log``, filtered lines to the console."""

    label: str
    argv: list[str]
    log: str
    show: OutputFilter = field(default_factory=OutputFilter)
    on_success: Callable[[], None] = lambda: None


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's setting; the same for the plain-python tools
    return env


def run_jobs(console: Console, stage: str, jobs: Sequence[Job], parallel: int = 1) -> None:
    """Run ``jobs``, at most ``parallel`` at a time, streaming their filtered output (prefixed with
    their label when there are several). A failure stops the others and raises StageFailed."""
    lock = threading.Lock()
    pending, procs, failures = list(jobs), [], []
    prefix = len(jobs) > 1

    def run(job: Job) -> None:
        os.makedirs(os.path.dirname(job.log), exist_ok=True)
        tail: list[str] = []
        why: list[str] = []
        with open(job.log, "w") as log:
            log.write("$ " + " ".join(job.argv) + "\n\n")
            log.flush()
            proc = subprocess.Popen(
                job.argv,
                cwd=REPO,
                env=_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
                start_new_session=True,
            )
            with lock:
                procs.append(proc)
            for line in proc.stdout:
                log.write(line)
                log.flush()
                tail = (tail + [line.rstrip()])[-12:]
                if _ERROR.search(line) or _EXCEPTION.search(line):
                    why = (why + [line.rstrip()])[-20:]
                shown = job.show(line)
                if shown:
                    console.line(f"{job.label}: {shown}" if prefix else shown)
            code = proc.wait()
        if code == 0:
            job.on_success()
            return
        with lock:
            if not failures:
                name = f"{stage} ({job.label})" if prefix else stage
                reason = _diagnosis(why) or tail
                failures.append(
                    StageFailed(
                        f"stage '{name}' failed (exit code {code}); its log: {job.log}\n    " + "\n    ".join(reason)
                    )
                )

    def stop_all() -> None:
        """SIGTERM to every running job's session (torchrun and its ranks), SIGKILL after 30 s."""
        with lock:
            running = [proc for proc in procs if proc.poll() is None]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in running:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 30
            for proc in running:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            running = [proc for proc in running if proc.poll() is None]
            if not running:
                return

    def worker() -> None:
        while True:
            with lock:
                if not pending or failures:
                    return
                job = pending.pop(0)
            try:
                run(job)
            except BaseException as error:  # on_success failing, or the console
                with lock:
                    failures.append(StageFailed(f"stage '{stage}' ({job.label}) failed: {error!r}; log: {job.log}"))
            if failures:
                stop_all()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, min(parallel, len(jobs))))]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)
    except KeyboardInterrupt:
        stop_all()
        raise
    if failures:
        raise failures[0]


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def _file_hash(rel: str) -> str:
    with open(os.path.join(REPO, rel), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


# ---------------------------------------------------------------------------------------------
# stages


@dataclass
class Unit:
    """One output of a stage (a stage may have several, run in parallel).

    ``work`` runs in this process (the data stage); ``job`` builds the subprocess. Either way the
    unit must leave ``outputs`` complete; then its stamp is written."""

    key: str
    outputs: list[str]
    params: dict
    deps: list[str]
    job: Optional[Callable[[], Job]] = None
    work: Optional[Callable[[], None]] = None


class Pipeline:
    def __init__(self, workdir: str, settings: Settings, nproc: int, jobs: int, console: Console) -> None:
        self.w, self.s, self.nproc, self.jobs, self.console = workdir, settings, nproc, jobs, console
        self.stamps: dict[str, str] = {}
        self.times: list[tuple[str, float, bool]] = []  # (title, seconds, skipped)
        self.number = 0

    def path(self, *parts: str) -> str:
        return os.path.join(self.w, *parts)

    def log(self, name: str) -> str:
        return self.path("logs", f"{name}.log")

    def _stamp_file(self, key: str) -> str:
        return self.path(".stages", f"{key}.stamp")

    def _write_stamp(self, unit: Unit) -> None:
        missing = [o for o in unit.outputs if not os.path.exists(o)]
        if missing:
            raise StageFailed(f"stage '{unit.key}' finished but did not write {', '.join(missing)}")
        # a new run id: the stages that use this output see a new input and run again
        self.stamps[unit.key] = f"{self.stamps[unit.key]}-{time.time_ns():x}"
        path = self._stamp_file(unit.key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.write(self.stamps[unit.key] + "\n")
        os.replace(path + ".tmp", path)

    def stage(self, name: str, title: str, units: Sequence[Unit], parallel: int = 1) -> None:
        """Run the units of a stage that are not done yet (outputs and stamp present and current)."""
        self.number += 1
        self.console.header(self.number, title)
        todo = []
        for unit in units:
            blob = json.dumps({"params": unit.params, "deps": [self.stamps[d] for d in unit.deps]}, sort_keys=True)
            self.stamps[unit.key] = config = hashlib.sha256(blob.encode()).hexdigest()[:16]
            stamp_file = self._stamp_file(unit.key)
            stamp = open(stamp_file).read().strip() if os.path.exists(stamp_file) else ""
            if stamp.split("-")[0] == config and all(os.path.exists(o) for o in unit.outputs):
                self.stamps[unit.key] = stamp
                self.console.line(
                    f"skipped {unit.key}: done earlier ({', '.join(os.path.relpath(o, self.w) for o in unit.outputs)})"
                )
                continue
            _remove(stamp_file)
            for out in unit.outputs:  # stale or partial: start over
                _remove(out)
                _remove(out + ".tmp")
            todo.append(unit)
        for unit in todo:
            if unit.work is not None:
                unit.work()
                self._write_stamp(unit)
        jobs = []
        for unit in todo:
            if unit.job is not None:
                job = unit.job()
                job.on_success = lambda unit=unit, then=job.on_success: (then(), self._write_stamp(unit))
                jobs.append(job)
        if jobs:
            run_jobs(self.console, name, jobs, parallel)
        seconds = self.console.elapsed()
        self.times.append((name, seconds, not todo))
        if todo:
            self.console.line(f"stage done in {_fmt(seconds)}")

    # ----- flags shared by the training runs

    def prefix(self, domain: str) -> str:
        return self.path("data", "bin", f"{domain}_text_document")

    def equal_mixture(self) -> list[str]:
        flags = ["--data-path"]
        for d in DOMAINS:
            flags += [str(1 / len(DOMAINS)), self.prefix(d)]
        return flags

    def every(self, iters: int) -> int:
        """Log interval: a round number giving about ``log_lines`` lines."""
        step = max(1, iters // self.s.log_lines)
        scale = 10 ** (len(str(step)) - 1)
        return max(m * scale for m in (1, 2, 5) if m * scale <= step)

    def schedule(self, iters: int, lr: Optional[float]) -> list[str]:
        s = self.s
        flags = [] if lr is None else ["--lr", repr(lr), "--min-lr", repr(lr / 10)]
        return flags + [
            "--train-iters",
            str(iters),
            "--lr-warmup-iters",
            str(min(s.warmup_iters, iters // 2)),
            "--lr-decay-style",
            "cosine",
            "--log-interval",
            str(self.every(iters)),
            "--eval-interval",
            str(iters),
            "--eval-iters",
            str(s.eval_iters),
            "--save-interval",
            str(iters),
        ]

    def training(self, key: str, out: str, flags: list[str], iters: int) -> Callable[[], Job]:
        """A pretrain_bam.py run into OUT.tmp, renamed to OUT when it succeeded."""
        tmp = out + ".tmp"
        argv = torchrun(self.nproc, "pretrain_bam.py", *flags, "--load", tmp, "--save", tmp)
        return lambda: Job(key, argv, self.log(key), TrainingFilter(self.every(iters)), lambda: os.replace(tmp, out))

    def _rel(self, flags: Sequence[str]) -> list[str]:
        """Flags without the work directory (stamps survive moving it)."""
        return [f.replace(self.w, "W") for f in flags]

    # ----- the pipeline

    def run(self) -> None:
        for stage in (
            self.data,
            self.tokenizer,
            self.preprocess,
            self.seed,
            self.branch,
            self.experts,
            self.upcycle,
            self.mixtures,
            self.evaluate,
        ):
            stage()

    def data(self) -> None:
        out = self.path("data", "jsonl")

        def build() -> None:
            sys.path.insert(0, REPO)
            from bam_megatron.demo_data import build_corpora

            build_corpora(out + ".tmp", self.s.domain_bytes, DOMAINS, log=self.console.line)
            os.replace(out + ".tmp", out)

        params = {"bytes": self.s.domain_bytes, "source": _file_hash("bam_megatron/demo_data.py")}
        self.stage(
            "data",
            f"data: four domains of text, about {self.s.domain_bytes // 1000} KB each",
            [Unit("data", [out], params, [], work=build)],
        )

    def jsonl(self, domain: str) -> str:
        return self.path("data", "jsonl", f"{domain}.jsonl")

    def spm(self) -> str:
        return self.path("data", "tokenizer", "spm.model")

    def tokenizer(self) -> None:
        out = os.path.dirname(self.spm())

        def job() -> Job:
            os.makedirs(out + ".tmp")
            argv = python(
                "tools/train_tokenizer.py",
                "--input",
                *map(self.jsonl, DOMAINS),
                "--vocab-size",
                str(self.s.vocab_size),
                "--output-prefix",
                os.path.join(out + ".tmp", "spm"),
                "--workers",
                str(self.nproc),
            )
            return Job("tokenizer", argv, self.log("tokenizer"), on_success=lambda: os.replace(out + ".tmp", out))

        self.stage(
            "tokenizer",
            f"tokenizer: SentencePiece BPE, {self.s.vocab_size} pieces, on all four domains",
            [Unit("tokenizer", [out], {"vocab": self.s.vocab_size}, ["data"], job=job)],
        )

    def preprocess(self) -> None:
        out = os.path.dirname(self.prefix("general"))

        def work() -> None:
            os.makedirs(out + ".tmp")
            jobs = [
                Job(
                    d,
                    python(
                        "tools/preprocess_data.py",
                        "--input",
                        self.jsonl(d),
                        "--tokenizer-model",
                        self.spm(),
                        "--output-prefix",
                        os.path.join(out + ".tmp", d),
                        "--append-eod",
                        "--workers",
                        "1",
                    ),
                    self.log(f"preprocess-{d}"),
                    PrefixFilter("wrote"),
                )
                for d in DOMAINS
            ]
            run_jobs(self.console, "preprocess", jobs, parallel=self.nproc)
            os.replace(out + ".tmp", out)

        self.stage(
            "preprocess",
            "preprocess: JSONL -> megatron-core indexed datasets, one per domain",
            [Unit("preprocess", [out], {}, ["tokenizer"], work=work)],
        )

    def common(self) -> list[str]:
        """Architecture, tokenizer, data split and batch: the same for every training run."""
        s = self.s
        return [
            "--num-layers",
            str(s.num_layers),
            "--hidden-size",
            str(s.hidden_size),
            "--ffn-hidden-size",
            str(s.ffn_hidden_size),
            "--num-attention-heads",
            str(s.num_attention_heads),
            "--num-query-groups",
            str(s.num_attention_heads),
            "--seq-length",
            str(s.seq_length),
            "--tokenizer-model",
            self.spm(),
            "--split",
            s.split,
            "--micro-batch-size",
            str(s.micro_batch_size),
        ]

    def seed(self) -> None:
        s, out = self.s, self.path("seed")
        flags = ["--variant", "dense", *self.common(), *self.equal_mixture(), *self.schedule(s.seed_iters, s.seed_lr)]
        self.stage(
            "seed",
            f"phase 1: dense seed on an equal mixture of the four domains, {s.seed_iters} iterations",
            [
                Unit(
                    "seed",
                    [out],
                    {"flags": self._rel(flags)},
                    ["preprocess"],
                    job=self.training("seed", out, flags, s.seed_iters),
                )
            ],
        )

    def expert_dir(self, expert: str) -> str:
        return self.path("experts", expert)

    def branch(self) -> None:
        argv = python(
            "tools/branch.py",
            "--seed-checkpoint",
            self.path("seed"),
            "--output-dir",
            self.path("experts"),
            "--experts",
            *EXPERTS,
            "--domain-data",
            *[f"{e}={self.prefix(e)}" for e in EXPERTS],
            "--general-data",
            self.prefix("general"),
        )
        outputs = [self.path("experts"), *[os.path.join(self.expert_dir(e), "phase2.args") for e in EXPERTS]]
        self.stage(
            "branch",
            f"phase 1: branch the seed into {', '.join(EXPERTS)} experts",
            [Unit("branch", outputs, {}, ["seed"], job=lambda: Job("branch", argv, self.log("branch")))],
        )

    def experts(self) -> None:
        units = []
        for e in EXPERTS:  # tools/branch.py's flags (data mixture, LR), then the schedule
            out = os.path.join(self.expert_dir(e), "ckpt")
            flags = [f"@{os.path.join(self.expert_dir(e), 'phase2.args')}", *self.schedule(self.s.expert_iters, None)]
            units.append(
                Unit(
                    f"expert-{e}",
                    [out],
                    {"flags": self._rel(flags)},
                    ["branch"],
                    job=self.training(e, out, flags, self.s.expert_iters),
                )
            )
        self.stage(
            "experts",
            f"phase 2: each expert continues on 90% its domain + 10% general, {self.s.expert_iters} iterations",
            units,
            parallel=self.jobs,
        )

    def sources(self) -> dict[str, str]:
        """The dense models, in expert order: the seed first."""
        return {"seed": self.path("seed"), **{e: os.path.join(self.expert_dir(e), "ckpt") for e in EXPERTS}}

    def upcycle(self) -> None:
        units = []
        for m in MIXTURES:
            out = self.path(f"{m}-init")
            argv = python(
                "tools/upcycle.py",
                *[x for n, p in self.sources().items() for x in ("--expert", f"{n}={p}")],
                "--method",
                m,
                "--save",
                out,
            )
            units.append(
                Unit(
                    f"upcycle-{m}",
                    [out],
                    {},
                    ["seed", *[f"expert-{e}" for e in EXPERTS]],
                    job=lambda m=m, argv=argv: Job(m, argv, self.log(f"upcycle-{m}")),
                )
            )
        self.stage(
            "upcycle", "phase 3: upcycle seed + experts into 4-expert BTX and BAM mixtures", units, parallel=self.nproc
        )

    def mixtures(self) -> None:
        s, units = self.s, []
        for m in MIXTURES:
            flags = [
                "--variant",
                m,
                "--num-experts",
                str(len(EXPERTS) + 1),
                *self.common(),
                *self.equal_mixture(),
                *self.schedule(s.mix_iters, s.mix_lr),
                "--pretrained-checkpoint",
                self.path(f"{m}-init"),
            ]
            units.append(
                Unit(
                    m,
                    [self.path(m)],
                    {"flags": self._rel(flags)},
                    [f"upcycle-{m}"],
                    job=self.training(m, self.path(m), flags, s.mix_iters),
                )
            )
        self.stage(
            "mixtures",
            "phase 3: train BTX (averaged attention) and BAM (soft MoA) on the equal mixture, "
            f"{s.mix_iters} iterations",
            units,
            parallel=self.jobs,
        )

    def evaluate(self) -> None:
        out = self.path("eval")
        models = {**self.sources(), **{m: self.path(m) for m in MIXTURES}}
        args = [
            *[x for n, p in models.items() for x in ("--model", f"{n}={p}")],
            "--data-path",
            *map(self.prefix, DOMAINS),
            "--split",
            self.s.split,
            "--seq-length",
            str(self.s.seq_length),
            "--tokenizer-model",
            self.spm(),
            "--expert-names",
            *self.sources(),
            "--output-dir",
            out + ".tmp",
        ]
        if self.s.eval_samples:
            args += ["--eval-samples", str(self.s.eval_samples)]

        def job() -> Job:
            return Job(
                "eval",
                torchrun(self.nproc, "tools/eval.py", *args),
                self.log("eval"),
                EvalFilter(),
                lambda: os.replace(out + ".tmp", out),
            )

        deps = ["seed", *[f"expert-{e}" for e in EXPERTS], *MIXTURES]
        self.stage(
            "evaluate",
            "evaluate: per-domain perplexity of all six models, routing of the mixtures",
            [Unit("eval", [out], {"args": self._rel(args)}, deps, job=job)],
        )


# ---------------------------------------------------------------------------------------------
# the result


def report(workdir: str) -> bool:
    """Print the perplexity table and the checks; return whether every expectation holds."""
    eval_dir = os.path.join(workdir, "eval")
    with open(os.path.join(eval_dir, "perplexity.json")) as f:
        result = json.load(f)
    with open(os.path.join(eval_dir, "perplexity.md")) as f:
        table = f.read()
    ppl = {name: m["perplexity"] for name, m in result["models"].items()}
    print("\n" + "=" * 100)
    print(table.rstrip() + "\n")
    checks = [(f"the {e} expert beats the seed on {e}", ppl[e][e], ppl["seed"][e]) for e in EXPERTS]
    checks += [(f"{m.upper()} beats the seed on average", ppl[m]["average"], ppl["seed"]["average"]) for m in MIXTURES]
    for text, ours, seeds in checks:
        print(f"  [{'yes' if ours < seeds else 'NO '}] {text} (perplexity {ours:.2f} vs {seeds:.2f})")
    bam, btx = ppl["bam"]["average"], ppl["btx"]["average"]
    print(f"  (and BAM vs BTX on average: {bam:.2f} vs {btx:.2f}: {'BAM' if bam < btx else 'BTX'} is lower)")
    holds = all(ours < seeds for _, ours, seeds in checks)
    print(
        "\n"
        + (
            "As expected: every expert wins its domain, and both mixtures beat the seed."
            if holds
            else "Not every expectation held on this run (small models, few steps; see the table)."
        )
    )
    figures = sorted(glob.glob(os.path.join(eval_dir, "*.png")))
    print(f"Routing heatmaps: {', '.join(figures) if figures else '(none written)'}")
    print(f"Table: {os.path.join(eval_dir, 'perplexity.md')}   logs: {os.path.join(workdir, 'logs')}")
    return holds


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo", help="where everything goes (default: runs/demo)")
    p.add_argument("--fresh", action="store_true", help="delete the work directory first")
    p.add_argument("--quick", action="store_true", help="a few iterations per phase: a smoke test of the pipeline")
    p.add_argument("--nproc", type=int, default=2, help="data-parallel ranks per training run (default: 2)")
    p.add_argument(
        "--jobs", type=int, default=3, help="training runs at once in phases 2 and 3 (default: 3; they share the cores)"
    )
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    settings = Settings(**QUICK) if args.quick else Settings()
    workdir = os.path.abspath(args.workdir)
    if args.fresh and os.path.exists(workdir):
        shutil.rmtree(workdir)
    os.makedirs(workdir, exist_ok=True)
    lock = open(os.path.join(workdir, ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        print(f"bam_demo: error: another demo is running in {workdir}", file=sys.stderr)
        return 1
    console = Console()
    print(
        f"BAM demo{' --quick' if args.quick else ''}: work directory {workdir}; {args.nproc} ranks per training "
        f"run, up to {args.jobs} runs at once"
    )
    print("settings: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(settings).items()))
    pipeline = Pipeline(workdir, settings, args.nproc, args.jobs, console)
    signal.signal(signal.SIGTERM, _interrupt)  # stop the stage's processes, as Ctrl-C does
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    try:
        pipeline.run()
    except StageFailed as error:
        print(f"\nbam_demo: error: {error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\nbam_demo: interrupted; run the same command again to continue", file=sys.stderr, flush=True)
        return 130
    report(workdir)
    total = time.perf_counter() - console.start
    print(
        "Stage times: "
        + ", ".join(f"{name} {_fmt(t)}" + (" (skipped)" if skipped else "") for name, t, skipped in pipeline.times)
    )
    print(f"Total time: {_fmt(total)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
