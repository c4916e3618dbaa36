"""Print setup.py's install requirements minus what a base image already provides.

The Dockerfile builds on NVIDIA's PyTorch image, whose torch (with CUDA, Transformer Engine and
apex built against it) must not be replaced by the CPU-tested pin in setup.py:

    python tools/ci/image_requirements.py --keep numpy --constraints /etc/pip/constraint.txt \
        > /tmp/requirements.txt
    pip install -r /tmp/requirements.txt && pip install --no-deps -e .

torch is always left out; so is every ``--keep NAME`` and every package the ``--constraints``
file pins (NVIDIA's images list their own builds there) when the running Python already has it
installed, so that the image's build stays. ``--base`` prints the other half instead: what a
base image must already hold (the torch pin), for tools/ci/docker_base.sh's local stand-in for
NVIDIA's image.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Optional

SETUP = Path(__file__).resolve().parents[2] / "setup.py"


def install_requires(setup_py: Path = SETUP) -> list[str]:
    """INSTALL_REQUIRES of setup.py, read without running it."""
    for node in ast.parse(setup_py.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "INSTALL_REQUIRES" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise ValueError(f"{setup_py}: no INSTALL_REQUIRES list")


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def constrained(path: Optional[str]) -> list[str]:
    """Package names a pip constraints file pins (none if the file does not exist)."""
    if not path or not Path(path).is_file():
        return []
    lines = (line.split("#", 1)[0].strip() for line in Path(path).read_text().splitlines())
    return [_name(line) for line in lines if line and not line.startswith("-")]


def base_requirements(setup_py: Path = SETUP) -> list[str]:
    """What the base image must provide itself: setup.py's torch pin (the Dockerfile never installs torch)."""
    return [req for req in install_requires(setup_py) if _name(req) == "torch"]


def image_requirements(keep: Sequence[str] = (), setup_py: Path = SETUP) -> list[str]:
    """The requirements to pip install on top of the image."""
    kept = {_name(k) for k in keep}
    out = []
    for req in install_requires(setup_py):
        name = _name(req)
        if name == "torch" or (name in kept and _installed(name)):
            continue
        out.append(req)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print one requirement per line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--keep",
        nargs="*",
        default=[],
        metavar="NAME",
        help="packages whose installed version (the image's) stays; torch always does",
    )
    p.add_argument("--constraints", metavar="FILE", help="also keep what this pip constraints file pins")
    p.add_argument("--base", action="store_true", help="print what the base image must provide instead (torch)")
    args = p.parse_args(argv)
    if args.base:
        print("\n".join(base_requirements()))
        return 0
    print("\n".join(image_requirements([*args.keep, *constrained(args.constraints)])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
