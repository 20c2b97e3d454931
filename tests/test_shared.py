"""The scripts are copies by design; these helpers must stay identical wherever a script has them."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(REPO.glob("ppo*.py"))
SHARED = [
    "UserError",
    "VELOCITY_ENTRIES",
    "env_name",
    "gymnasium_has",
    "choose_backend",
    "layer_init",
    "choose_device",
    "numpy_module",
    "ROLLOUT_TOLERANCE",
    "rollout_mismatch",
    "check_rollout",
    "torch_policy",
    "rollout_policy",
    "compute_gae",
    "EpisodeTracker",
    "save_checkpoint",
    "load_checkpoint",
]
# ppo_lstm.py's rollout policies carry the LSTM state in and out: their own copies, checked by its tests.
DIFFERS_IN = {"torch_policy": ["ppo_lstm.py"], "rollout_policy": ["ppo_lstm.py"]}
# Helpers that ppo.py does not need: their reference is the script that introduced them.
SHARED_FROM = {
    "RunningMeanStd": "ppo_continuous.py",
    "ObsNormalizer": "ppo_continuous.py",
    "ReturnScaler": "ppo_continuous.py",
}


def top_level_sources(path: Path) -> dict:
    """Name -> source of each top-level function, class and constant (all the statements that assign it)."""
    source, sources = path.read_text(), {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            sources[node.name] = ast.get_source_segment(source, node)
        elif isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    sources[target.id] = sources.get(target.id, "") + ast.get_source_segment(source, node) + "\n"
    return sources


def same(source: str, reference: str, name: str) -> bool:
    """Functions and classes: the same source. Constants: the same value, however the literal is laid out."""
    if source == reference:
        return True
    if name.isupper():
        values = [{}, {}]
        for namespace, code in zip(values, (source, reference)):
            exec(code, {}, namespace)  # the assignments of a constant of this repo's own scripts
        return values[0][name] == values[1][name]
    return False


@pytest.mark.parametrize("name", SHARED + list(SHARED_FROM))
def test_shared_helper_is_identical(name):
    sources = {path.name: top_level_sources(path) for path in SCRIPTS}
    origin = SHARED_FROM.get(name, "ppo.py")
    assert name in sources[origin], f"{origin}, the reference, no longer defines {name}"
    reference = sources[origin][name]
    differing = [
        script
        for script, defs in sources.items()
        if name in defs and script not in DIFFERS_IN.get(name, []) and not same(defs[name], reference, name)
    ]
    assert not differing, f"{name} differs from {origin}'s in {differing}: change them together"


def test_no_script_imports_another():
    for path in SCRIPTS:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.startswith("ppo") for n in names), f"{path.name} imports another script"
