"""What a test does when the machine cannot give it a service it needs (Slurm, dockerd, a tmpfs mount).

Where a developer's machine lacks the service, the test is skipped with the reason. A CI run (`make test`
exports ``BAM_TESTS_STRICT=1``) as root has every means to install and start these services, so there a
test that cannot get one fails instead: a skip would hide that the test did not run.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

STRICT_ENV = "BAM_TESTS_STRICT"


def strict() -> bool:
    """True in a CI run as root, where a missing service is a failure rather than a skip."""
    return os.environ.get(STRICT_ENV) == "1" and os.geteuid() == 0


def unavailable(service: str, reason: str) -> NoReturn:
    """Skip the test because ``service`` cannot be had here (``reason``); fail instead where `strict()`."""
    if strict():
        pytest.fail(f"{service} is needed and a CI run as root should have it ({STRICT_ENV}=1): {reason}")
    pytest.skip(f"{service}: {reason}")
