"""Shared test helpers: run a script as a user would, and read what it logged."""

import contextlib
import importlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run_script(script: str, *args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python SCRIPT ARGS` in cwd (its runs/ folder lands there), wandb offline, and return the result."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run(
        [sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def run_in_process(script: str, *args: str, cwd: Path, timeout: float | None = None) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` as its `__main__` block runs it, in this process (no new interpreter and imports): a
    UserError is one `error:` line on stderr and exit status 2; any other exception propagates (a traceback). The
    run_script twin for runs that need no process of their own; timeout is run_script's, not applied here."""
    import torch

    module = importlib.import_module(script[: -len(".py")])
    stdout, stderr, argv, here, threads = io.StringIO(), io.StringIO(), sys.argv, os.getcwd(), torch.get_num_threads()
    returncode = 0
    try:
        sys.argv = [script, *args]
        os.chdir(cwd)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                module.main(module.parse_args())
            except module.UserError as e:
                print(f"error: {e}", file=sys.stderr)
                returncode = 2
            except SystemExit as e:  # a script that ends its own process for an error (ppo_pbt.py's set-up on ranks)
                returncode = e.code
    finally:  # what a script sets for its process, put back for the next test
        sys.argv = argv
        os.chdir(here)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess([script, *args], returncode, stdout.getvalue(), stderr.getvalue())


def only_run_dir(cwd: Path) -> Path:
    (run_dir,) = (cwd / "runs").iterdir()
    return run_dir


def read_scalars(run_dir: Path) -> dict:
    """{tag: [(step, value), ...]} over every TensorBoard event file in run_dir, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})  # 0: keep every point, no sampling
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(points, key=lambda p: p[0]) for tag, points in scalars.items()}


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
