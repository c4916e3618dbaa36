"""Where things are, for every test: the repository, its scripts and the committed fixtures."""

from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRETRAIN_SCRIPT = os.path.join(REPO, "pretrain_bam.py")
EXAMPLES = os.path.join(REPO, "examples")
FIXTURES = os.path.join(REPO, "tests", "fixtures")
