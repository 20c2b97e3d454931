"""Shared test helpers: run a script as a user would, and read what it logged."""

import contextlib
import importlib
import importlib.util
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


def run_in_process(script, *args: str, cwd: Path, timeout: float | None = None) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` as its `__main__` block runs it, in this process (no new interpreter and imports): an
    `error:` line on stderr and its exit status for bad input or a failed run; any other exception propagates (a
    traceback). script: a script's name, or a module (an edited copy). The run_script twin for runs that need no
    process of their own; timeout is run_script's, not applied here."""
    import torch
    import tyro

    module = importlib.import_module(script[: -len(".py")]) if isinstance(script, str) else script
    stdout, stderr, argv, here, threads = io.StringIO(), io.StringIO(), sys.argv, os.getcwd(), torch.get_num_threads()
    returncode, name = 0, script if isinstance(script, str) else Path(module.__file__).name
    try:
        sys.argv = [name, *args]
        os.chdir(cwd)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                module.main(tyro.cli(module.Args, args=list(args)))
            except SystemExit as e:  # fail(): one `error:` line, then exit
                returncode = e.code
    finally:  # what a script sets for its process, put back for the next test
        sys.argv = argv
        os.chdir(here)
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)  # the Atari scripts flush denormals
    return subprocess.CompletedProcess([name, *args], returncode, stdout.getvalue(), stderr.getvalue())


def edited_copy(script: str, edits: list, folder: Path):
    """The script with each (old, new) replacement made, written to folder and imported as a module of its own: a
    researcher's edit of a copy."""
    source = (REPO / script).read_text()
    for old, new in edits:
        assert old in source, f"the edit no longer applies to {script}: {old!r}"
        source = source.replace(old, new)
    path = folder / script
    path.write_text(source)
    name = f"edited_{script[:-3]}_{abs(hash(tuple(edits)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


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


MPIEXEC = Path(sys.executable).parent / "mpiexec"  # MPICH's, installed with mpi4py into the venv (requirements.txt)


def mpirun(num_ranks: int, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `mpiexec -n NUM_RANKS python ARGS` in cwd, wandb offline. The fork launcher starts every rank on this
    machine (never ssh); an outer MPI job's variables are dropped so that this mpiexec starts a job of its own."""
    if not MPIEXEC.exists():
        pytest.fail(f"no {MPIEXEC}: install requirements.txt (mpi4py and mpich) into this Python's venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "HYDRA_", "HYDI_"))}
    env |= {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    command = [str(MPIEXEC), "-launcher", "fork", "-n", str(num_ranks), sys.executable, *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
