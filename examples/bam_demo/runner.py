"""The demo's machinery, nothing BAM-specific: a console, subprocess jobs, stages that are skipped
when they are done, and stopping cleanly on Ctrl-C or SIGTERM.

A stage is a list of units (``Unit``): outputs, the settings that made them and the units they
depend on. ``Stages.stage`` hashes settings and dependencies into a stamp under WORKDIR/.stages and
skips a unit whose outputs exist with a current stamp; otherwise it deletes what is left of it and
runs it (in this process, or as a subprocess ``Job`` whose log goes to WORKDIR/logs/).
"""

from __future__ import annotations

import fcntl
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
from typing import IO, Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class StageFailed(RuntimeError):
    """A stage's command failed: names the stage and its log."""


# ---------------------------------------------------------------------------------------------
# output


def fmt(seconds: float) -> str:
    """``seconds`` as minutes and seconds: 1m05.3s."""
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


class Console:
    """Lines stamped with the time since the stage started; one lock for parallel jobs."""

    def __init__(self, stages: int) -> None:
        self.stages = stages
        self.start = self.stage_start = time.perf_counter()
        self.lock = threading.Lock()

    def header(self, number: int, title: str) -> None:
        """Start stage ``number`` (of ``stages``): its title and the time since the demo started."""
        self.stage_start = time.perf_counter()
        with self.lock:
            print(f"\n=== [{number}/{self.stages}] {title}   (at {fmt(self.stage_start - self.start)})", flush=True)

    def line(self, text: str) -> None:
        """One line of the current stage, stamped with the seconds since it started."""
        with self.lock:
            print(f"  [{time.perf_counter() - self.stage_start:6.1f}s] {text}", flush=True)

    def elapsed(self) -> float:
        """Seconds since the current stage started."""
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
        """The line to print for ``line`` (warnings and noise already dropped), or None."""
        return line


class TrainingFilter(OutputFilter):
    """pretrain_bam.py: every ``every``-th iteration line (condensed), validation, checkpoints, errors."""

    def __init__(self, every: int) -> None:
        super().__init__()
        self.every = every

    def show(self, line: str) -> Optional[str]:
        """Iteration lines condensed to loss and speed; validation, checkpoint and error lines as they are."""
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
        """Every line but the tables (and their headings) and the lists of files written."""
        hidden = ("|", "wrote", "routing heatmaps", "Own expert's share")
        return None if not line.strip() or line.startswith(hidden) else line


class PrefixFilter(OutputFilter):
    """Only lines that start with one of ``prefixes`` (and errors)."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def show(self, line: str) -> Optional[str]:
        """``line`` if it starts with one of the prefixes or is an error line, else None."""
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
    """The command line of a plain-Python tool, run with this interpreter."""
    return [sys.executable, *args]


def torchrun(nproc: int, *args: str) -> list[str]:
    """The command line of a distributed tool: torchrun with ``nproc`` ranks on this machine; one rank
    runs as a plain process (the tools take a world of one without torchrun's variables), which saves
    the launcher's own start."""
    if nproc == 1:
        return python(*args)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def file_hash(rel: str) -> str:
    """A short hash of the file at ``rel`` (relative to the repository root): a stage's source."""
    with open(os.path.join(REPO, rel), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


# ---------------------------------------------------------------------------------------------
# stages and their stamps


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


class Stages:
    """Stages run in order under one work directory, each skipped when it is done and current."""

    def __init__(self, workdir: str, console: Console) -> None:
        self.w, self.console = workdir, console
        self.stamps: dict[str, str] = {}
        self.times: list[tuple[str, float, bool]] = []  # (title, seconds, skipped)
        self.number = 0

    def path(self, *parts: str) -> str:
        """A path under the work directory."""
        return os.path.join(self.w, *parts)

    def log(self, name: str) -> str:
        """The log file of job ``name``."""
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
            self.console.line(f"stage done in {fmt(seconds)}")


# ---------------------------------------------------------------------------------------------
# the process


def lock_workdir(workdir: str) -> Optional[IO[str]]:
    """An exclusive lock on ``workdir`` (keep the returned file open); None if another demo holds it."""
    lock = open(os.path.join(workdir, ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        return None
    return lock


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def stop_on_signals() -> None:
    """SIGTERM and SIGINT raise KeyboardInterrupt, which stops the running stage's processes."""
    signal.signal(signal.SIGTERM, _interrupt)  # stop the stage's processes, as Ctrl-C does
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
