"""The Dockerfile, built and run for real.

NVIDIA's registry is out of reach here, so the repo's Dockerfile is built on a local stand-in for
its base (``--build-arg BASE_IMAGE``): tools/ci/docker_base.sh makes it from Debian's packages
(debootstrap of bookworm, Python 3.11, setup.py's torch pin as the CPU build). The build is offline:
its pip reads a wheelhouse that the test serves on loopback. Inside the container (no network but
loopback) the test runs bam-stats, a two-rank training (torchrun, gloo, mock data) and bam-upcycle
of that checkpoint, and checks the results from the host. What only NVIDIA's image has (CUDA, NCCL,
Transformer Engine, apex) is not exercised: docs/cluster.md.

The test starts its own dockerd (as root; its socket and state in a temporary directory, images and
build cache in the cache directory) and stops it afterwards. Everything slow is cached in
$BAM_DOCKER_CACHE (default ~/.cache/bam-megatron/docker): the base's tarball, the wheelhouse and
the daemon's images and layers, so that a rerun rebuilds only the layers whose files changed.
`make test` installs docker.io and debootstrap where it can (tools/ci/install_docker.sh); where
dockerd is missing or cannot start, the test is skipped with the reason.
"""

from __future__ import annotations

import functools
import http.server
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from bam_megatron import stats as bam_stats
from bam_megatron.checkpoint import store
from tests.support import paths, services

REPO = Path(paths.REPO)
sys.path.insert(0, str(REPO / "tools" / "ci"))
try:
    import image_requirements as ir
finally:
    sys.path.pop(0)
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
CACHE = Path(os.environ.get("BAM_DOCKER_CACHE", Path.home() / ".cache" / "bam-megatron" / "docker"))
IMAGE = "bam-megatron:test-cpu"
TRAIN_ITERS = 3
WHEELHOUSE_PORT = 47311

pytestmark = pytest.mark.e2e


def _missing_reason() -> str | None:
    """Why no dockerd can be started here, or None."""
    missing = [tool for tool in ("dockerd", "docker", "debootstrap") if shutil.which(tool, path=SBIN_PATH) is None]
    if missing:
        return (
            f"Docker not installed ({', '.join(missing)} missing): apt-get install docker.io debootstrap "
            "(make test runs tools/ci/install_docker.sh)"
        )
    if os.geteuid() != 0:
        return "dockerd must run as root; run the Docker test as root"
    return None


class LocalDockerd:
    """A private dockerd: socket and run state under ``run_dir``, images and layers in the cache.

    No bridge network or iptables rules: builds share the host's network (loopback reaches the
    wheelhouse), containers get none but their own loopback.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.socket = run_dir / "docker.sock"
        self.log = run_dir / "dockerd.log"
        self.env = dict(os.environ, PATH=SBIN_PATH, DOCKER_HOST=f"unix://{self.socket}", DOCKER_BUILDKIT="0")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> str | None:
        """Start it and wait until it answers; the reason it could not, or None."""
        CACHE.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    "dockerd",
                    f"--host=unix://{self.socket}",
                    f"--data-root={CACHE / 'data-root'}",
                    f"--exec-root={self.run_dir / 'exec'}",
                    # one daemon per data root: a second one refuses to start while this pid file lives
                    f"--pidfile={CACHE / 'dockerd.pid'}",
                    "--bridge=none",
                    "--iptables=false",
                    "--ip-masq=false",
                ],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"dockerd exited with {self.proc.returncode}: {self._log_tail()}"
            if self.docker("version", check=False, timeout=30).returncode == 0:
                return None
            time.sleep(1)
        return f"dockerd did not answer within {timeout:.0f} s: {self._log_tail()}"

    def _log_tail(self) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines()
        return " | ".join(lines[-3:])

    def docker(self, *args: str, check: bool = True, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
        """Run the docker client against this daemon; its output captured as text."""
        result = subprocess.run(
            ["docker", *args], env=self.env, capture_output=True, text=True, timeout=timeout, **kwargs
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def stop(self) -> None:
        """SIGTERM (dockerd stops its containerd), SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def dockerd():
    reason = _missing_reason()
    if reason:
        services.unavailable("Docker", reason)
    run_dir = Path(tempfile.mkdtemp(prefix="bam-dockerd-"))  # short: containerd's socket paths are limited
    daemon = LocalDockerd(run_dir)
    try:
        reason = daemon.start()
        if reason:
            services.unavailable("Docker", f"dockerd cannot start here ({reason})")
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def wheelhouse_url(dockerd, tmp_path_factory):
    """tools/ci/docker_base.sh's wheelhouse, served on 127.0.0.1 for the build's pip.

    The URL is part of the build's cache key (a build argument): the same port every run where it
    is free, and the wheelhouse's own name (a hash of what it holds) in the path.
    """
    wheels = Path(_docker_base(dockerd, "--wheels"))
    served = tmp_path_factory.mktemp("wheelhouse")
    (served / wheels.name).symlink_to(wheels)
    handler = functools.partial(_QuietHandler, directory=str(served))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEELHOUSE_PORT), handler)
    except OSError:  # taken: any port, at the price of rebuilding the requirements' layer
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{wheels.name}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


def _docker_base(daemon: LocalDockerd, *args: str) -> str:
    """Run tools/ci/docker_base.sh against the daemon; its one line of output."""
    result = subprocess.run(
        ["bash", str(REPO / "tools" / "ci" / "docker_base.sh"), *args],
        env=dict(daemon.env, PYTHON=sys.executable, BAM_DOCKER_CACHE=str(CACHE)),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="module")
def image(dockerd, wheelhouse_url):
    """The repo's Dockerfile built on the local base, offline."""
    base = _docker_base(dockerd)
    dockerd.docker(
        "build",
        "--network=host",
        f"--build-arg=BASE_IMAGE={base}",
        "--build-arg=PIP_NO_INDEX=1",
        f"--build-arg=PIP_FIND_LINKS={wheelhouse_url}",
        f"--tag={IMAGE}",
        str(REPO),
        timeout=1800,
    )
    dockerd.docker("image", "prune", "--force")  # the image this tag replaced, if any: keep the cache small
    return IMAGE


def _in_image(dockerd: LocalDockerd, work: Path, script: str) -> str:
    """Run ``script`` (bash) in the image, without network, ``work`` mounted at /runs; its stdout.

    With no network the container's hostname must resolve to loopback itself: torchrun's
    rendezvous and gloo look it up.
    """
    result = dockerd.docker(
        "run",
        "--rm",
        "--network=none",
        "--hostname=bam-test",
        "--add-host=bam-test:127.0.0.1",
        f"--volume={work}:/runs",
        IMAGE,
        *("bash", "-euo", "pipefail", "-c", script),
        timeout=300,  # a container left behind is stopped with the daemon
    )
    return result.stdout


def test_image_runs_stats_training_and_upcycle(dockerd, image, tmp_path, capsys):
    """bam-stats, 2-rank training (gloo) and bam-upcycle in the image, the results read on the host."""
    # setup.py's pins from the wheelhouse; the base's torch (the CPU build) the one the build recorded and kept
    recorded, *freeze = _in_image(dockerd, tmp_path, "cat /tmp/torch-version; pip freeze").split()
    assert recorded == "2.13.0+cpu"
    for pin in ("torch==2.13.0+cpu", *ir.image_requirements()):
        assert pin in freeze or "==" not in pin, (pin, freeze)
    assert any(line.startswith("-e") for line in freeze) and "bam-megatron" in " ".join(freeze), freeze

    stats_args = ["--preset", "tiny", "--variant", "bam", "--num-experts", "2", "--json"]
    stats = json.loads(_in_image(dockerd, tmp_path, "bam-stats " + " ".join(stats_args)))
    capsys.readouterr()
    assert bam_stats.main(stats_args) == 0
    assert stats == json.loads(capsys.readouterr().out)

    log = _in_image(
        dockerd,
        tmp_path,
        "torchrun --standalone --nproc-per-node 2 pretrain_bam.py --variant dense --preset tiny --mock-data "
        f"--vocab-size 512 --seq-length 64 --micro-batch-size 2 --train-iters {TRAIN_ITERS} --log-interval 1 "
        "--save /runs/seed 2>&1",
    )
    assert f"saved checkpoint /runs/seed/iter_{TRAIN_ITERS:07d}" in log, log
    records = [json.loads(line) for line in open(tmp_path / "seed" / "metrics.jsonl")]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["iteration"] for r in train] == list(range(1, TRAIN_ITERS + 1)), records
    assert all(math.isfinite(r["lm_loss"]) for r in train), train
    assert train[0]["global_batch_size"] == 2 * 2  # micro-batch 2 on each of the 2 data-parallel ranks
    assert store.latest_iteration(str(tmp_path / "seed")) == TRAIN_ITERS

    log = _in_image(
        dockerd, tmp_path, "bam-upcycle --method bam --expert seed=/runs/seed --expert code=/runs/seed --save /runs/bam"
    )
    assert "wrote /runs/bam: bam with 2 experts from seed, code" in log, log
    meta = store.read_meta(str(tmp_path / "bam" / "iter_0000000"))
    assert (meta.architecture.variant, meta.architecture.num_experts) == ("bam", 2)
    manifest = json.loads((tmp_path / "bam" / "upcycle_manifest.json").read_text())
    assert manifest["method"] == "bam" and len(manifest["sources"]) == 2, manifest
