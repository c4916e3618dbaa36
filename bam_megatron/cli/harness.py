"""bam-eval harness: downstream tasks through lm-evaluation-harness, on each checkpoint's Hugging Face export.

    bam-eval harness --load seed=ckpt/seed --load bam=ckpt/bam --tasks bam_mc,bam_gen --out eval/harness
    bam-eval harness --load ckpt/bam --tasks arc_easy,gsm8k,mmlu --num-fewshot 5 --out eval/harness  # a hub

For each ``--load`` in turn: the checkpoint is exported with ``bam-convert-hf export``'s code
(``--format auto``: a native transformers class where one computes the model exactly, else the
remote code, loaded with ``trust_remote_code``) into a temporary directory, lm-eval's ``hf`` model
runs the tasks on it (``lm_eval.simple_evaluate``), and the export is deleted. The table
(results.md) and lm-eval's own numbers (results.json) are written at the end, atomically, only
when every model has run. Task names, checkpoints and flags are checked before any export; bad
input is one line ``bam-eval harness: error: ...``, exit 2, nothing written.

Tasks come from ``bam_megatron/evaluation/tasks`` (``bam_mc``, ``bam_legal``, ``bam_gen``, tag
``bam_local``: offline), any ``--include-path`` directory, then lm-eval's built-in tasks (indexed
only when a name is not found locally: about a minute; their datasets come from the Hugging Face
Hub).

It lives in `bam_megatron.cli` because it joins two layers of equal rank: evaluation (the tasks,
the table) and conversion (the Hugging Face export).
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from bam_megatron.errors import ConfigError, UserError, run_tool

PROG = "bam-eval harness"
LM_EVAL_VERSION = "0.4.13"  # the version setup.py's "eval" extra pins and the tests run


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``bam-eval harness``."""
    from bam_megatron.conversion.hf.export import DTYPES, FORMATS

    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--load",
        action="append",
        required=True,
        metavar="[NAME=]CHECKPOINT",
        help="a --save directory (its latest iteration) or an iter_* directory; repeat for more columns "
        "(NAME defaults to the directory's name)",
    )
    p.add_argument(
        "--tasks",
        required=True,
        help="comma-separated lm-eval task, group or tag names, or glob patterns "
        "(local: bam_mc, bam_legal, bam_gen, tag bam_local)",
    )
    p.add_argument("--out", required=True, help="output directory: results.md, results.json (samples_*.jsonl)")
    p.add_argument(
        "--include-path", action="append", default=[], metavar="DIR", help="another directory of lm-eval task YAMLs"
    )
    p.add_argument(
        "--no-builtin-tasks",
        action="store_true",
        help="look names up only in the local tasks and --include-path (skips indexing lm-eval's ~15k task files)",
    )
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    p.add_argument("--limit", type=int, default=None, help="first N documents of each task (a smoke run)")
    p.add_argument("--batch-size", default="8", help="lm-eval's batch size: N or auto (default: 8)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the export's and the model's dtype")
    p.add_argument("--format", choices=FORMATS, default="auto", help="export format (bam-convert-hf's --format)")
    p.add_argument("--seed", type=int, default=1234, help="lm-eval's random, numpy, torch and few-shot seeds")
    p.add_argument("--log-samples", action="store_true", help="also write every document's inputs and outputs")
    p.add_argument(
        "--confirm-run-unsafe-code",
        action="store_true",
        help="let tasks that execute the model's output run it (humaneval, mbpp; also needs HF_ALLOW_CODE_EVAL=1)",
    )
    p.add_argument("--tmp-dir", default=None, help="where the temporary exports go (default: the system's)")
    return p


@dataclass
class ModelRun:
    """One ``--load``: its column name, checkpoint and, once run, what lm-eval returned."""

    name: str
    checkpoint: str
    variant: str = ""
    export_format: str = ""
    notes: list[str] = field(default_factory=list)
    output: dict[str, Any] = field(default_factory=dict)


def parse_loads(flags: Sequence[str]) -> list[tuple[str, str]]:
    """``[NAME=]CHECKPOINT`` flags -> (name, path); an unnamed checkpoint is named after its directory."""
    pairs = []
    for flag in flags:
        name, sep, path = flag.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.normpath(flag)), flag
        if not name or not path:
            raise ConfigError(f"--load expects [NAME=]CHECKPOINT, got {flag!r}")
        pairs.append((name, path))
    names = [name for name, _ in pairs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"--load names must be unique; repeated: {', '.join(repeated)} (name them NAME=CHECKPOINT)")
    return pairs


def local_task_dirs(include_paths: Sequence[str]) -> list[str]:
    """The project's task directory and every ``--include-path`` (which must exist)."""
    from bam_megatron.evaluation.tasks import TASKS_DIR

    for path in include_paths:
        if not os.path.isdir(path):
            raise ConfigError(f"--include-path {path} is not a directory")
    return [TASKS_DIR, *include_paths]


def _lm_eval():
    """lm_eval, or a one-line error saying how to install it."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise UserError(
            f"lm-evaluation-harness is not installed ({error}): pip install -e '.[eval]' (lm-eval=={LM_EVAL_VERSION})"
        ) from None
    return lm_eval, TaskManager


def _matches(names: Sequence[str], known: Sequence[str]) -> dict[str, list[str]]:
    """Each requested name or glob -> the known task/group/tag names it matches."""
    return {name: sorted(fnmatch.filter(known, name)) for name in names}


def resolve_tasks(names: Sequence[str], include_paths: Sequence[str], builtin: bool):
    """(TaskManager, task names): the local task directories first; lm-eval's built-in tasks
    indexed only if a name is not found there (and ``builtin``). An unknown name is an error."""
    _, TaskManager = _lm_eval()
    dirs = local_task_dirs(include_paths)
    manager = local = TaskManager(include_path=dirs, include_defaults=False)
    found = _matches(names, manager.all_tasks)
    missing = [name for name, hits in found.items() if not hits]
    if missing and builtin:
        print(f"{PROG}: indexing lm-eval's built-in tasks for {', '.join(missing)} ...", flush=True)
        manager = TaskManager(include_path=dirs, include_defaults=True)
        found = _matches(names, manager.all_tasks)
        missing = [name for name, hits in found.items() if not hits]
    if missing:
        where = "the local tasks or lm-eval's" if builtin else "the local tasks (--no-builtin-tasks)"
        names_here = ", ".join(sorted(local.all_tasks))
        raise ConfigError(f"unknown task {', '.join(missing)}: not in {where}; local tasks: {names_here}")
    tasks = list(dict.fromkeys(hit for hits in found.values() for hit in hits))
    return manager, tasks


@dataclass
class Plan:
    """Everything checked before the first export."""

    runs: list[ModelRun]
    tasks: list[str]
    manager: Any


def prepare(args: argparse.Namespace) -> Plan:
    """Check the flags, checkpoints and task names (nothing is exported or written)."""
    from bam_megatron.evaluation.checkpoints import find_models

    for flag in ("num_fewshot", "limit"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "num_fewshot" else 1):
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= {0 if flag == 'num_fewshot' else 1}, got {value}")
    if args.batch_size != "auto" and not (args.batch_size.isdigit() and int(args.batch_size) >= 1):
        raise ConfigError(f"--batch-size must be a positive integer or auto, got {args.batch_size!r}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ConfigError(f"--out {args.out} is a file")
    if args.tmp_dir is not None and not os.path.isdir(args.tmp_dir):
        raise ConfigError(f"--tmp-dir {args.tmp_dir} is not a directory")
    models = find_models(parse_loads(args.load))
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise ConfigError("--tasks names no task")
    manager, tasks = resolve_tasks(names, args.include_path, builtin=not args.no_builtin_tasks)
    runs = [ModelRun(m.name, m.path, m.variant) for m in models]
    return Plan(runs, tasks, manager)


def export_for_harness(checkpoint: str, directory: str, fmt: str, dtype: str) -> tuple[str, Any]:
    """Export ``checkpoint`` to ``directory``/hf with bam-convert-hf's code; (path, its report).

    The export starts a world of one for megatron-core; it is torn down here so that lm-eval
    (and accelerate) find no process group."""
    import torch.distributed as dist

    from bam_megatron.conversion.hf.export import export_checkpoint
    from bam_megatron.platform.distributed import destroy

    started_here = not dist.is_initialized()
    path = os.path.join(directory, "hf")
    try:
        report = export_checkpoint(checkpoint, path, fmt, dtype)
    finally:
        if started_here and dist.is_initialized():
            destroy()
    return path, report


def default_device() -> str:
    """cuda where usable, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_harness(hf_dir: str, remote_code: bool, plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    """lm_eval.simple_evaluate with its ``hf`` model on one export; the parts of its output we keep."""
    lm_eval, _ = _lm_eval()
    model_args = {
        "pretrained": hf_dir,
        "dtype": args.dtype,
        "trust_remote_code": remote_code,
    }
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=plan.tasks,
        num_fewshot=args.num_fewshot,
        batch_size=int(args.batch_size) if args.batch_size.isdigit() else args.batch_size,
        device=args.device or default_device(),
        limit=args.limit,
        task_manager=plan.manager,
        log_samples=args.log_samples,
        random_seed=args.seed,
        numpy_random_seed=args.seed,
        torch_random_seed=args.seed,
        fewshot_random_seed=args.seed,
        confirm_run_unsafe_code=args.confirm_run_unsafe_code,
    )
    keep = ("results", "groups", "group_subtasks", "n-shot", "n-samples", "higher_is_better", "versions")
    kept = {key: out[key] for key in keep if key in out}
    if args.log_samples:
        kept["samples"] = out.get("samples", {})
    return kept


def evaluate(plan: Plan, args: argparse.Namespace) -> None:
    """Export, evaluate and delete each model's export in turn (fills ``plan.runs``)."""
    for run in plan.runs:
        print(f"{run.name}: exporting {run.checkpoint} ({run.variant})", flush=True)
        with tempfile.TemporaryDirectory(prefix="bam-harness-", dir=args.tmp_dir) as tmp:
            hf_dir, report = export_for_harness(run.checkpoint, tmp, args.format, args.dtype)
            run.export_format, run.notes = report.format, list(report.notes)
            for note in report.notes:
                print(f"{run.name}: note: {note}", flush=True)
            print(f"{run.name}: lm-eval on {', '.join(plan.tasks)} ({report.format} export)", flush=True)
            run.output = run_harness(hf_dir, report.format == "bam", plan, args)


def _run(args: argparse.Namespace) -> int:
    from bam_megatron.evaluation import harness_table
    from bam_megatron.platform.atomic import write_atomically

    plan = prepare(args)
    evaluate(plan, args)
    files = harness_table.render(plan.runs, plan.tasks, vars(args))
    print(files["results.md"].decode(), end="", flush=True)
    os.makedirs(args.out, exist_ok=True)
    for name, content in files.items():
        write_atomically(os.path.join(args.out, name), content)
    print(f"wrote {', '.join(os.path.join(args.out, n) for n in files)}", flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``bam-eval harness``; exit code 2 for bad input."""
    import bam_megatron  # noqa: F401  (quiet megatron-core's import-time warnings)

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return run_tool(PROG, lambda: _run(args))
