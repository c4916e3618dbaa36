"""The test suite's own layout: tests live in rooms that mirror the package, share helpers only through
tests/support, and a CI run as root fails where a service it needs is missing instead of skipping."""

from __future__ import annotations

import ast
import os

import pytest

from tests.support import paths, services

TESTS = os.path.join(paths.REPO, "tests")
PACKAGE = os.path.join(paths.REPO, "bam_megatron")
# Rooms that are not a package directory: whole pipelines, the examples, the benchmarks' scripts.
OTHER_ROOMS = {"e2e", "examples", "bench"}
# What is about the repository as a whole stays at the top.
TOP_LEVEL = {"test_layering.py", "test_rooms.py"}


def _test_modules() -> list[str]:
    found = []
    for directory, dirs, files in os.walk(TESTS):
        dirs[:] = [d for d in dirs if d not in ("fixtures", "__pycache__")]
        found += [os.path.join(directory, f) for f in files if f.startswith("test_") and f.endswith(".py")]
    return found


def test_every_test_module_is_in_a_room_that_mirrors_the_package():
    misplaced = []
    for path in _test_modules():
        room = os.path.relpath(os.path.dirname(path), TESTS)
        if room == ".":
            if os.path.basename(path) not in TOP_LEVEL:
                misplaced.append(path)
        elif room.split(os.sep)[0] not in OTHER_ROOMS and not os.path.isdir(os.path.join(PACKAGE, room)):
            misplaced.append(path)
    assert not misplaced, misplaced
    assert len(_test_modules()) > 40


def test_no_test_module_imports_another():
    offenders = []
    for path in _test_modules() + [os.path.join(TESTS, "conftest.py")]:
        for node in ast.walk(ast.parse(open(path).read(), path)):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.startswith("tests") and any(part.startswith("test_") for part in name.split(".")):
                    offenders.append(f"{os.path.relpath(path, paths.REPO)} imports {name}")
    assert not offenders, offenders


@pytest.mark.parametrize("env, euid, outcome", [("1", 0, "failed"), ("1", 1000, "skipped"), ("", 0, "skipped")])
def test_a_missing_service_fails_a_strict_run_as_root_and_is_skipped_elsewhere(monkeypatch, env, euid, outcome):
    monkeypatch.setenv(services.STRICT_ENV, env)
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    expected = pytest.fail.Exception if outcome == "failed" else pytest.skip.Exception
    with pytest.raises(expected, match="dockerd cannot start"):
        services.unavailable("Docker", "dockerd cannot start")
