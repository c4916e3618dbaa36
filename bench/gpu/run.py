"""The prepared GPU run: one command installs the carried wheels, runs the GPU tests and measures.

    bash bench/gpu/run.sh                 # on a lent GPU (docs/benchmarks.md, "GPU run")
    bash bench/gpu/run.sh --dry-run       # here: every step's code on the CPU at tiny shapes

Steps, in order, each with a time budget (the whole run stays under --budget seconds; a step
that would start with too little time left is skipped, with the reason):

1. ``install``: the wheels pinned in bench/gpu/wheels.txt, from --wheels (default .whl/), with
   ``pip install --no-index --no-deps --target``; the project itself via PYTHONPATH. In a dry run
   nothing is installed: the record lists what would be.
2. ``gpu_tests``: ``pytest -m gpu tests/platform/test_gpu.py`` (in a dry run on a CPU: deselected).
3. bench/gpu/measure.py's parts (``env``, ``matmul_peak``, ``train_mfu``, ``soft_moa_vs_loop``,
   ``parallel_vs_sequential``), each in its own process on a GPU, all in one in a dry run.
4. ``decode_latency``: bench/decode_latency.py when it exists (in a dry run only ``--help``).

Everything goes to --out (default $OUT, else ./bench-gpu-out): ``results.json`` (every record,
rewritten after each step), ``records.jsonl`` (the raw records), ``summary.md`` (the table, also
printed last); bench/gpu/run.sh adds ``log.txt``. Exit code 0 when no step failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MEASURE = os.path.join(ROOT, "bench", "gpu", "measure.py")
WHEELS_TXT = os.path.join(ROOT, "bench", "gpu", "wheels.txt")
DECODE = os.path.join(ROOT, "bench", "decode_latency.py")
PROCESS_GROUP_ENV = "BAM_GPU_BENCH_PROCESS_GROUP"
"""Set to 'gloo' for measure.py's retry after an NCCL failure (measure.py starts the group itself)."""
MEASURE_PARTS = ("env", "matmul_peak", "train_mfu", "soft_moa_vs_loop", "parallel_vs_sequential")
BUDGET_S = {
    "install": 60,
    "gpu_tests": 120,
    "env": 40,
    "matmul_peak": 40,
    "train_mfu": 200,
    "soft_moa_vs_loop": 45,
    "parallel_vs_sequential": 45,
    "decode_latency": 150,
}
"""Most seconds each step may take on the GPU (a step's process is killed past it)."""
GROUPS = (
    ("gpu_tests",),
    ("env", "matmul_peak"),
    ("train_mfu",),
    ("soft_moa_vs_loop", "parallel_vs_sequential"),
    ("decode_latency",),
)
"""The steps after ``install``, in order, and which share a process on the GPU (a dry run measures in
one process: 7 s of imports each on a small CPU)."""
STEPS = ("install", *(step for group in GROUPS for step in group))
MIN_START_S = 15
"""A step does not start with less time than this left in the run's budget."""
PYTHON_TAG = "cp312"
"""The lent machine's Python (3.12.3; docs/benchmarks.md, "What the machine has"): wheels with
compiled code must carry this tag."""


def read_pins(path: str = WHEELS_TXT) -> list[tuple[str, str]]:
    """(name, version) of each ``NAME==VERSION`` line of bench/gpu/wheels.txt (comments skipped)."""
    pins = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, version = line.split("==")
                pins.append((name.strip(), version.strip()))
    return pins


def wheel_prefix(name: str, version: str) -> str:
    """The start of a wheel's file name for a pin (PEP 427: '-', '.' in the name become '_')."""
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def find_wheels(directory: str, pins: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """(the wheel file of each pin found in ``directory``, the pins with none or more than one)."""
    files = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    found, problems = [], []
    for name, version in pins:
        matches = [f for f in files if f.lower().startswith(wheel_prefix(name, version)) and f.endswith(".whl")]
        compatible = [f for f in matches if f"-{PYTHON_TAG}-" in f or "-py3-none-" in f]
        if len(compatible) == 1:
            found.append(os.path.join(directory, compatible[0]))
        else:
            problems.append(f"{name}=={version}: {len(compatible)} {PYTHON_TAG} wheels in {directory} ({matches})")
    return found, problems


def parse_report(stdout: str) -> tuple[Optional[dict], Optional[str]]:
    """The last JSON record a bench script printed (`bench.common.report`) and the line after it."""
    lines = stdout.splitlines()
    for end in range(len(lines) - 1, -1, -1):
        if lines[end] != "}":
            continue
        for start in range(end, -1, -1):
            if lines[start] == "{":
                try:
                    record = json.loads("\n".join(lines[start : end + 1]))
                except json.JSONDecodeError:
                    break
                summary = next((line for line in lines[end + 1 :] if line.strip()), None)
                return record, summary
    return None, None


def run_process(command: list[str], timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """Run ``command`` in its own process group, its output passed through and kept; killed (the
    whole group) past ``timeout`` seconds."""
    clock = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    captured: list[str] = []

    def pump() -> None:
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            captured.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        process.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, signal.SIGKILL)  # the group this Popen started, forked ranks included
        process.wait()
    reader.join(timeout=10)
    return {
        "command": command,
        "returncode": process.returncode,
        "timed_out": timed_out,
        "seconds": round(time.perf_counter() - clock, 1),
        "output": "".join(captured),
    }


class Run:
    """One run's state: the deadline, the records, and the files under --out."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dry_run = args.dry_run
        self.start = time.monotonic()
        self.deadline = self.start + args.budget
        os.makedirs(args.out, exist_ok=True)
        self.records_path = os.path.join(args.out, "records.jsonl")
        if os.path.exists(self.records_path):
            os.remove(self.records_path)
        self.results: dict[str, Any] = {
            "dry_run": self.dry_run,
            "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "budget_s": args.budget,
            "steps": {},
            "records": {},
            "summaries": [],
        }
        self.env = dict(os.environ)
        paths = [ROOT] + ([args.site] if not self.dry_run and not args.no_install else [])
        self.env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
        self.env["PYTHONUNBUFFERED"] = "1"
        if self.dry_run:
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is a CPU run, GPU or not

    def left(self) -> float:
        """Seconds left in the run's budget."""
        return self.deadline - time.monotonic()

    def timeout(self, steps: list[str]) -> float:
        """The time limit of steps run together: their budgets (the rest of the run in a dry run),
        at most what the run has left."""
        return self.left() if self.dry_run else min(sum(BUDGET_S[s] for s in steps), self.left())

    def set_step(self, step: str, status: str, **details: Any) -> None:
        """Record a step's outcome and rewrite results.json."""
        self.results["steps"][step] = {"status": status, **details}
        self.results["elapsed_s"] = round(time.monotonic() - self.start, 1)
        self.write()

    def add_record(self, part: str, record: dict, summary: Optional[str]) -> None:
        """Keep a record (a part may give several) and its one-line summary."""
        self.results["records"].setdefault(part, []).append(record)
        if summary:
            self.results["summaries"].append(summary)

    def write(self) -> None:
        """results.json, complete after every step (a run cut short keeps what it finished)."""
        path = os.path.join(self.args.out, "results.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.results, f, indent=2)
        os.replace(path + ".tmp", path)


def step_install(run: Run) -> None:
    """pip install --no-index --no-deps --target the pinned wheels (a dry run lists them only)."""
    pins = read_pins()
    wheels, problems = find_wheels(run.args.wheels, pins)
    expected = [wheel_prefix(n, v) + f"*-{PYTHON_TAG}-*.whl" for n, v in pins]
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--upgrade",
        "--target",
        run.args.site,
        *wheels,
    ]
    details = {"pins": [f"{n}=={v}" for n, v in pins], "expected_wheels": expected, "wheels": wheels}
    if run.dry_run or run.args.no_install:
        reason = "dry run: nothing installed" if run.dry_run else "--no-install"
        print(f"install: {reason}; would install {', '.join(expected)} (found here: {wheels or 'none'})")
        run.set_step("install", "skipped", reason=reason, would_run=command, problems=problems, **details)
        return
    if problems:
        print("install: FAILED: " + "; ".join(problems))
        run.set_step("install", "failed", problems=problems, **details)
        return
    result = run_process(command, run.timeout(["install"]), run.env)
    ok = result["returncode"] == 0
    print(f"install: {'installed' if ok else 'FAILED'} {', '.join(os.path.basename(w) for w in wheels)}")
    run.set_step("install", "ok" if ok else "failed", site=run.args.site, **details, **_brief(result))


def _brief(result: dict) -> dict:
    """A process result for results.json: its output's tail only (log.txt has all of it)."""
    return {k: (v[-3000:] if k == "output" else v) for k, v in result.items()}


def step_gpu_tests(run: Run) -> None:
    """pytest -m gpu tests/platform/test_gpu.py: counts and each test's outcome (junit XML)."""
    import tempfile
    import xml.etree.ElementTree as ElementTree

    junit = os.path.join(tempfile.mkdtemp(prefix="bam-gpu-tests-"), "junit.xml")
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/platform/test_gpu.py", "-p", "no:cacheprovider"]
    command += ["-q", f"--junitxml={junit}"]
    result = run_process(command, run.timeout(["gpu_tests"]), run.env)
    tests = []
    if os.path.exists(junit):
        for case in ElementTree.parse(junit).getroot().iter("testcase"):
            outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
            tests.append({"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0))})
    last = result["output"].strip().splitlines()[-1:] or [""]
    counts = {
        word: int(number) for number, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", last[0])
    }
    # exit code 5: no test ran, which is right where there is no GPU (conftest deselects the tier)
    deselected_on_cpu = run.dry_run and result["returncode"] == 5 and counts.get("deselected", 0) > 0
    ok = result["returncode"] == 0 or deselected_on_cpu
    status = "ok" if ok else ("timeout" if result["timed_out"] else "failed")
    record = {"bench": "gpu_tests", "status": status, "counts": counts, "tests": tests, "pytest_line": last[0]}
    run.add_record("gpu_tests", record, f"gpu_tests: {last[0]} (exit code {result['returncode']})")
    run.set_step("gpu_tests", status, **_brief(result))


def step_measure(run: Run, parts: list[str]) -> None:
    """bench/gpu/measure.py for ``parts`` in one process; each part's records and outcome. Parts that
    fail on an NCCL error run once more over a gloo process group (one rank needs no NCCL)."""
    failed, output = _measure(run, parts, {})
    if failed and "NCCL" in output and not run.dry_run and run.left() >= MIN_START_S:
        print(f"\n=== {' '.join(failed)}: NCCL failed; again over a gloo process group ===", flush=True)
        first = {part: dict(run.results["steps"][part]) for part in failed}
        _measure(run, failed, {PROCESS_GROUP_ENV: "gloo"})
        for part in failed:
            run.results["steps"][part]["first_attempt_nccl"] = first[part]
        run.write()


def _measure(run: Run, parts: list[str], extra_env: dict[str, str]) -> tuple[list[str], str]:
    """One measure.py process for ``parts``; (the parts not ok, its output)."""
    command = [sys.executable, MEASURE, *parts, "--records", run.records_path]
    peak = _peak_tflops(run)
    if peak is not None:
        command += ["--peak-tflops", str(peak)]
    if run.dry_run:
        command.append("--dry-run")
    seen = _read_records(run.records_path)
    result = run_process(command, run.timeout(parts), {**run.env, **extra_env})
    new = _read_records(run.records_path)[len(seen) :]
    seconds = {line["part"]: line["done_s"] for line in new if "done_s" in line}
    new = [line for line in new if "record" in line]
    for line in new:
        run.add_record(line["part"], line["record"], line["summary"])
    not_ok = []
    for part in parts:
        records = [line["record"] for line in new if line["part"] == part]
        if not records or part not in seconds:  # it did not finish
            status = "timeout" if result["timed_out"] else "failed"
        elif any(r.get("status") == "failed" for r in records):
            status = "failed"
        else:
            status = "ok"
        details = {"records": len(records), "returncode": result["returncode"], "seconds": seconds.get(part)}
        details["process_seconds"] = result["seconds"]  # of the process, imports included (shared by a group)
        if extra_env:
            details["environment"] = extra_env
        if status != "ok":
            details["output_tail"] = result["output"][-3000:]
            not_ok.append(part)
        run.set_step(part, status, **details)
    return not_ok, result["output"]


def _peak_tflops(run: Run) -> Optional[float]:
    for record in run.results["records"].get("matmul_peak", []):
        if record.get("status") == "ok":
            return record["peak_tflops"]
    return None


def _read_records(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def step_decode_latency(run: Run) -> None:
    """bench/decode_latency.py (another engineer's) if it is in this checkout; a dry run asks its --help."""
    if not os.path.exists(DECODE):
        reason = "bench/decode_latency.py is not in this checkout"
        print(f"decode_latency: skipped: {reason}")
        run.add_record("decode_latency", {"bench": "decode_latency", "status": "skipped", "reason": reason}, None)
        run.set_step("decode_latency", "skipped", reason=reason)
        return
    extra = ["--help"] if run.dry_run else run.args.decode_args.split()
    with open(DECODE) as f:
        has_device_flag = '"--device"' in f.read()
    if not run.dry_run and has_device_flag and "--device" not in extra:
        extra += ["--device", "cuda"]  # where the script can decode on the GPU, it should
    result = run_process([sys.executable, DECODE, *extra], run.timeout(["decode_latency"]), run.env)
    record, summary = parse_report(result["output"])
    ok = result["returncode"] == 0 and (run.dry_run or record is not None)
    status = "ok" if ok else ("timeout" if result["timed_out"] else "failed")
    wrapped = {
        "bench": "decode_latency",
        "status": status,
        "arguments": extra,
        "returncode": result["returncode"],
        "seconds": result["seconds"],
        "record": record,
        "note": "dry run: --help only (the script's models are paper-590m sized)" if run.dry_run else None,
        "script_has_device_flag": has_device_flag,
    }
    line = summary if summary else f"decode_latency: exit code {result['returncode']} ({' '.join(extra)})"
    run.add_record("decode_latency", wrapped, line)
    run.set_step("decode_latency", status, **_brief(result))


# ------------------------------------------------------------------------------------------------
# the summary table


def _pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def summary_markdown(results: dict) -> str:
    """The run as a markdown table (what summary.md holds and the run prints last)."""
    records = results["records"]
    lines = [
        f"# GPU run {results['started_utc']}{' (DRY RUN: CPU, tiny shapes, fp32)' if results['dry_run'] else ''}",
        "",
    ]
    env = next(iter(records.get("env", [])), {})
    if env.get("status") == "ok":
        differ = ", ".join(f"{name} {v['here']}" for name, v in env["differ_from_setup_py_pins"].items())
        te = "imports" if env["transformer_engine"]["importable"] else "absent"
        lines += [
            f"{env['device']}; Python {env['python']}, torch {env['torch']} (CUDA {env['torch_cuda']}), "
            f"megatron-core {env['packages'].get('megatron-core')}, Transformer Engine {te}; "
            f"differ from setup.py's pins: {differ or 'none'}",
            "",
        ]
    peak = next((r for r in records.get("matmul_peak", []) if r.get("status") == "ok"), None)
    if peak:
        lines += [f"MFU denominator: {peak['peak_definition']} = {peak['peak_tflops']:.1f} TFLOP/s", ""]
    train = [r for r in records.get("train_mfu", []) if r.get("bench") == "gpu_train_mfu"]
    if train:
        lines += [
            "| spec | model | tokens/s | ms/step | MFU with output layer | MFU layers only | peak memory |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in train:
            if r.get("status") == "ok":
                memory = f"{r['peak_memory_gib']} GiB" if "peak_memory_gib" in r else "—"
                lines.append(
                    f"| {r['backend']} | {r['variant']} | {r['tokens_per_s']:.0f} | {r['step_ms_median']:.1f} | "
                    f"{_pct(r['mfu_with_output_layer'])} | {_pct(r['mfu_layers_only'])} | {memory} |"
                )
            else:
                why = r.get("reason") or r.get("error", "")
                lines.append(f"| {r['backend']} | {r.get('variant', 'all')} | {r['status']}: {why[:120]} | | | | |")
        lines.append("")
    for r in records.get("train_mfu", []):
        if r.get("bench") == "gpu_train_mfu_goals" and "dense_mfu_goal_met" in r:
            text = f"Goals ({r['backend']} spec): dense MFU ≥ 45%: {_pct(r['dense_mfu_with_output_layer'])} " + (
                "✔" if r["dense_mfu_goal_met"] else "✘"
            )
            if "bam_over_dense_goal_met" in r:
                text += (
                    f"; BAM ≥ 0.9 × dense MFU: {r['bam_over_dense_mfu_with_output_layer']:.3f} "
                    f"{'✔' if r['bam_over_dense_goal_met'] else '✘'} "
                    f"(layers only {r['bam_over_dense_mfu_layers_only']:.3f})"
                )
            lines += [text, ""]
    lines += ["| step | status | seconds |", "|---|---|---:|"]
    for step, outcome in results["steps"].items():
        why = outcome.get("reason") or ""
        lines.append(f"| {step} | {outcome['status']}{': ' + why if why else ''} | {outcome.get('seconds', '')} |")
    lines += ["", "One line per measurement:", ""] + [f"- {s}" for s in results["summaries"]]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    """Run every step within the budget; write results.json and summary.md; 0 when none failed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench-gpu-out"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, fp32, no install")
    parser.add_argument(
        "--dry-run-without-cuda", action="store_true", help="a dry run where CUDA is absent, the real run where not"
    )
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (default 450)")
    parser.add_argument("--wheels", default=os.path.join(ROOT, ".whl"), help="folder of the carried wheels")
    parser.add_argument("--site", default="/tmp/bam-site", help="pip --target folder (put on PYTHONPATH)")
    parser.add_argument("--no-install", action="store_true", help="megatron-core is installed already")
    parser.add_argument("--only", nargs="+", choices=STEPS, default=None, help="run only these steps")
    parser.add_argument(
        "--decode-args", default="--rounds 1", help="arguments of bench/decode_latency.py (default: --rounds 1)"
    )
    args = parser.parse_args(argv)
    if not args.dry_run:
        cuda = subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True, text=True
        ).stdout.strip()
        if cuda != "True":
            if not args.dry_run_without_cuda:
                parser.error("CUDA is not available here: pass --dry-run (or --dry-run-without-cuda)")
            args.dry_run = True
    run = Run(args)
    wanted = set(args.only or STEPS)
    print(f"GPU run{' (dry run)' if run.dry_run else ''}: budget {args.budget:.0f} s, output in {args.out}", flush=True)
    if "install" in wanted:
        step_install(run)
    if run.dry_run:
        groups = [("gpu_tests",), MEASURE_PARTS, ("decode_latency",)]
    else:
        groups = list(GROUPS)
    for group in groups:
        group = [step for step in group if step in wanted]
        if not group:
            continue
        if run.left() < MIN_START_S:
            for step in group:
                reason = f"out of time: {run.left():.0f} s left of the {args.budget:.0f} s budget"
                print(f"{step}: skipped: {reason}")
                run.set_step(step, "skipped", reason=reason)
            continue
        print(f"\n=== {' '.join(group)} ({run.left():.0f} s left) ===", flush=True)
        if group == ["gpu_tests"]:
            step_gpu_tests(run)
        elif group == ["decode_latency"]:
            step_decode_latency(run)
        else:
            step_measure(run, group)
    run.results["elapsed_s"] = round(time.monotonic() - run.start, 1)
    run.write()
    text = summary_markdown(run.results)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    print("\n" + text, flush=True)
    failed = [s for s, o in run.results["steps"].items() if o["status"] in ("failed", "timeout")]
    print(f"GPU run done in {run.results['elapsed_s']} s; failed: {', '.join(failed) or 'none'}; files in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
