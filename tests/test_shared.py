"""The scripts are copies by design; these helpers must stay the same code wherever a script has them. Code, not
text: comments and docstrings may fit their script (they are not compared)."""

import ast
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(REPO.glob("ppo*.py"))
# The family (DESIGN.md): each script is its parent plus one idea, within a bound on the lines `diff PARENT SCRIPT`
# marks changed. ppo.py's bound is on its length.
BOUNDS = {"ppo.py": 450, "ppo_continuous.py": 200, "ppo_atari.py": 200, "ppo_mpi.py": 200, "ppo_atari_mpi.py": 200}
BOUNDS |= {"ppo_gsde.py": 150, "ppo_masked.py": 150, "ppo_lstm_masked.py": 150, "ppo_bc.py": 150}
BOUNDS |= {"ppo_lstm.py": 250, "ppo_pbt.py": 250}


def parent(path: Path) -> str | None:
    """The parent a script names in its first docstring line (`ppo_x.py: ppo.py + its idea`); None for ppo.py, the
    reference, and for a script not yet rebuilt on it."""
    first = (ast.get_docstring(ast.parse(path.read_text())) or "").splitlines()[0]
    match = re.match(rf"{path.name}: (ppo\w*\.py) \+ ", first)
    return match.group(1) if match else None


REBUILT = [path for path in SCRIPTS if path.name == "ppo.py" or parent(path)]
# The definitions a script changes because its idea is to (the diff shows them); every other top-level function, class
# and constant it shares with its parent must be the parent's code (Args, Agent and main are the idea's own).
OWN = ["Args", "Agent", "main"]
CHANGES = {
    "ppo_masked.py": ["make_envs", "evaluate"],  # a Dict observation's mask moved to info; masks in evaluation
    "ppo_bc.py": ["check_args", "evaluate"],  # its flags; the expert's steps recorded
    "ppo_lstm.py": ["check_args", "make_envs", "evaluate"],  # sequences; Box actions clipped; the LSTM state
    "ppo_lstm_masked.py": ["make_envs", "evaluate"],  # as ppo_masked.py's
    "ppo_pbt.py": ["fail"],  # MPI: one line from one rank, MPI_Abort for a rank that fails alone
    "ppo_continuous.py": ["check_args", "evaluate"],  # --hidden-size; the statistics frozen, the Gaussian's mean
    "ppo_gsde.py": ["check_args"],  # --sde-sample-freq
    "ppo_atari.py": ["make_envs", "evaluate"],  # envpool, seeded at creation; uint8 frames
    "ppo_mpi.py": ["fail"],  # as ppo_pbt.py's
    "ppo_atari_mpi.py": ["fail"],
}


def code(node: ast.AST) -> str:
    """The node's code as its syntax tree, without the docstrings of it and its inner functions and classes."""
    for inner in ast.walk(node):
        if isinstance(inner, ast.FunctionDef | ast.ClassDef) and inner.body:
            first = inner.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                inner.body = inner.body[1:] or [ast.Pass()]
    return ast.dump(node)


def top_level_code(path: Path) -> dict:
    """Name -> code of each top-level function and class; constants -> their value."""
    definitions = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            definitions[node.name] = code(node)
        elif isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name) and target.id.isupper():
                    # a constant of this repo's own scripts: its value, however the literal is laid out (a dict
                    # extended by |= included); one computed from imports (e.g. math.log) by its code
                    namespace = {target.id: definitions.get(target.id)}
                    try:
                        exec(compile(ast.Module([node], []), str(path), "exec"), {}, namespace)
                        definitions[target.id] = namespace[target.id]
                    except NameError:
                        definitions[target.id] = code(node)
    return definitions


@pytest.mark.parametrize("path", [path for path in REBUILT if parent(path)], ids=lambda path: path.name)
def test_shared_definitions_are_the_parents_code(path):
    mine, parents = top_level_code(path), top_level_code(REPO / parent(path))
    differing = [name for name in mine.keys() & parents.keys()
                 if name not in OWN + CHANGES.get(path.name, []) and mine[name] != parents[name]]  # fmt: skip
    assert not differing, f"{path.name}: {differing} differ from {parent(path)}'s: change them together"


@pytest.mark.parametrize("path", REBUILT, ids=lambda path: path.name)
def test_family_bounds(path):
    if path.name == "ppo.py":
        assert len(path.read_text().splitlines()) <= BOUNDS["ppo.py"]
        return
    diff = subprocess.run(["diff", parent(path), path.name], cwd=REPO, capture_output=True, text=True).stdout
    changed = sum(line[:1] in "<>" for line in diff.splitlines())
    assert changed <= BOUNDS[path.name], f"{path.name}: {changed} changed lines against {parent(path)}"


def test_no_script_imports_another():
    for path in SCRIPTS:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.startswith("ppo") for n in names), f"{path.name} imports another script"


def test_readme_table_counts_the_lines_of_every_script():
    """The README's table of scripts gives each one's line count and the lines `diff PARENT X` marks changed (ppo.py
    for a script not yet rebuilt on the new ppo.py)."""
    table = {
        name: (int(lines), changed)
        for name, lines, changed in re.findall(
            r"^\| `(ppo\w*\.py)` \|[^|]*\| (\d+) \| ([\d-]+) \|", (REPO / "README.md").read_text(), re.M
        )
    }
    assert sorted(table) == sorted(path.name for path in SCRIPTS), "the README's table lists every script"
    for path in SCRIPTS:
        lines = len(path.read_text().splitlines())
        against = parent(path) or "ppo.py"
        diff = subprocess.run(["diff", against, path.name], cwd=REPO, capture_output=True, text=True).stdout
        changed = "-" if path.name == "ppo.py" else str(sum(line[:1] in "<>" for line in diff.splitlines()))
        assert table[path.name] == (lines, changed), f"README: {path.name} has {lines} lines, {changed} changed"
