"""The scripts are copies by design; these helpers must stay the same code wherever a script has them. Code, not
text: comments and docstrings may fit their script (they are not compared)."""

import ast
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(REPO.glob("ppo*.py"))
SHARED = [
    "UserError",
    "VELOCITY_ENTRIES",
    "env_name",
    "validate_args",
    "check_numbers",
    "parse_args",
    "gymnasium_has",
    "choose_backend",
    "make_envs",
    "observed_space",
    "encoded_size",
    "encode_obs",
    "velocity_mask",
    "choose_device",
    "layer_init",
    "numpy_module",
    "ROLLOUT_TOLERANCE",
    "rollout_mismatch",
    "check_rollout",
    "torch_policy",
    "rollout_policy",
    "check_finite",
    "Progress",
    "compute_gae",
    "EpisodeTracker",
    "save_checkpoint",
    "load_checkpoint",
    "follow_checkpoint",
    "open_run",
    "load_agent",
    "save_dataset",
    "load_dataset",
]
# Where a copy differs by design, and why.
DIFFERS_IN = {
    # a batch is the steps of every rank (ppo_mpi.py); images and their own flags (ppo_atari.py, ppo_lstm.py); gSDE's
    # flags (ppo_continuous.py, ppo_lstm.py)
    "validate_args": ["ppo_atari.py", "ppo_continuous.py", "ppo_lstm.py", "ppo_mpi.py"],
    # envpool's Atari preprocessing (ppo_atari.py; ppo_lstm.py for Atari ids)
    "make_envs": ["ppo_atari.py", "ppo_lstm.py"],
    # ppo_lstm.py's rollout policies carry the LSTM state in and out, ppo_continuous.py's take gSDE's noise (checked
    # against the network by their tests)
    "torch_policy": ["ppo_continuous.py", "ppo_lstm.py"],
    "rollout_policy": ["ppo_continuous.py", "ppo_lstm.py"],
}
# Helpers that ppo.py does not need: their reference is the script that introduced them.
SHARED_FROM = {
    "RunningMeanStd": "ppo_continuous.py",
    "ObsNormalizer": "ppo_continuous.py",
    "ReturnScaler": "ppo_continuous.py",
    "BF16_ROLLOUT_TOLERANCE": "ppo_atari.py",
    "track_games": "ppo_atari.py",
    "is_atari": "ppo_lstm.py",
    "on_every_rank": "ppo_mpi.py",
    "check_launcher": "ppo_mpi.py",
    "parse_args_on_ranks": "ppo_mpi.py",
}
# ppo_mpi.py's Atari path is ppo_atari.py's code under names beside its own (copy's name: ppo_atari.py's).
RENAMED = {"AtariAgent": "Agent", "make_atari_envs": "make_envs", "evaluate_games": "evaluate"}


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


@pytest.mark.parametrize("name", SHARED + list(SHARED_FROM))
def test_shared_helper_is_the_same_code(name):
    definitions = {path.name: top_level_code(path) for path in SCRIPTS}
    origin = SHARED_FROM.get(name, "ppo.py")
    assert name in definitions[origin], f"{origin}, the reference, no longer defines {name}"
    reference = definitions[origin][name]
    differing = [
        script
        for script, defs in definitions.items()
        if name in defs and script not in DIFFERS_IN.get(name, []) and defs[name] != reference
    ]
    assert not differing, f"{name} differs from {origin}'s in {differing}: change them together"


@pytest.mark.parametrize("copy_name", RENAMED)
def test_ppo_mpi_atari_helpers_are_ppo_atari_code(copy_name):
    class Rename(ast.NodeTransformer):
        def visit_Name(self, node):
            node.id = RENAMED.get(node.id, node.id)
            return node

    tree = ast.parse((REPO / "ppo_mpi.py").read_text())
    (node,) = [node for node in tree.body if getattr(node, "name", None) == copy_name]
    node = Rename().visit(node)
    node.name = RENAMED[copy_name]
    assert code(node) == top_level_code(REPO / "ppo_atari.py")[RENAMED[copy_name]], f"change {copy_name} with it"


def test_the_comparison_ignores_comments_and_docstrings_but_not_code():
    source = "def f(x):\n    {}\n    return x + 1  # one\n"
    parse = lambda text: code(ast.parse(text).body[0])  # noqa: E731
    assert parse(source.format('"""a docstring"""')) == parse(source.format('"""another"""').replace("one", "two"))
    assert parse(source.format("pass")) != parse(source.format("pass").replace("x + 1", "x + 2"))


def test_no_script_imports_another():
    for path in SCRIPTS:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.startswith("ppo") for n in names), f"{path.name} imports another script"


def test_readme_table_counts_the_lines_of_every_script():
    """The README's table of scripts gives each one's line count and the lines `diff ppo.py X` marks changed."""
    table = {
        name: (int(lines), changed)
        for name, lines, changed in re.findall(
            r"^\| `(ppo\w*\.py)` \|[^|]*\| (\d+) \| ([\d-]+) \|", (REPO / "README.md").read_text(), re.M
        )
    }
    assert sorted(table) == sorted(path.name for path in SCRIPTS), "the README's table lists every script"
    for path in SCRIPTS:
        lines = len(path.read_text().splitlines())
        diff = subprocess.run(["diff", "ppo.py", path.name], cwd=REPO, capture_output=True, text=True).stdout
        changed = "-" if path.name == "ppo.py" else str(sum(line[:1] in "<>" for line in diff.splitlines()))
        assert table[path.name] == (lines, changed), f"README: {path.name} has {lines} lines, {changed} changed"
