"""A researcher's first edits, applied to a copy of each script not yet rebuilt on the new ppo.py (its edits are in
test_ppo.py): each copy trains or stops at once with one line. Never a traceback, never a run whose rollout samples
another policy than the one trained, never a run in which the optimizer moves nothing."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, read_scalars

# Each edit: (old, new) text replacements, every `old` present in the script (else the catalogue is stale).
RELU = [("nn.Tanh()", "nn.ReLU()")]
SYMLOG = "torch.sign(x.flatten(1)) * torch.log1p(x.flatten(1).abs())"  # a common input transform (DreamerV3)
# CleanRL's optimizer habits: AdamW, a second parameter group, zero_grad keeping the gradients' memory.
ADAMW = [("torch.optim.Adam(", "torch.optim.AdamW(")]
GROUPS = [
    (
        "torch.optim.Adam(agent.parameters(),",
        'torch.optim.Adam([{"params": agent.actor.parameters()}, {"params": agent.critic.parameters(), "lr": 1e-3}],',
    )
]
ZERO_GRAD = [("optimizer.zero_grad()", "optimizer.zero_grad(set_to_none=False)")]
# A random layer: the update's network no longer gives the rollout's log-probabilities. The guard must stop it.
DROPOUT = [("nn.Tanh(),", "nn.Tanh(), nn.Dropout(0.1),")]
MLP = {
    "relu": RELU,
    "layernorm": [("layer_init(nn.Linear(obs_dim, 64)),", "layer_init(nn.Linear(obs_dim, 64)), nn.LayerNorm(64),")],
    "wide": [(", 64)", ", 256)"), ("(64, ", "(256, ")],
    # actor and critic on one shared first layer, applied in features(): a module the rollout's mirror cannot see
    "shared trunk": [
        ("layer_init(nn.Linear(obs_dim, 64)),", "layer_init(nn.Linear(64, 64)),"),
        (
            "        self.critic = nn.Sequential(",
            "        self.trunk = nn.Sequential(layer_init(nn.Linear(obs_dim, 64)), nn.Tanh())\n"
            "        self.critic = nn.Sequential(",
        ),
        (
            "    def features(self, x):\n",
            "    def features(self, x):\n        return self.trunk(self.encode(x))\n\n    def encode(self, x):\n",
        ),
    ],
    "features": [("return x[:, : self.obs_cols]", f"x = x[:, : self.obs_cols]\n        return {SYMLOG}")],
    # a residual input branch initialised to zero: the network is unchanged until it trains, then it is not
    "zero-init branch": [
        (
            "        self.critic = nn.Sequential(",
            "        self.branch = nn.Linear(obs_dim, obs_dim)\n"
            "        nn.init.zeros_(self.branch.weight), nn.init.zeros_(self.branch.bias)\n"
            "        self.critic = nn.Sequential(",
        ),
        (
            "    def features(self, x):\n",
            "    def features(self, x):\n        x = self.encode(x)\n        return x + self.branch(x)\n\n"
            "    def encode(self, x):\n",
        ),
    ],
    "adamw": ADAMW,
    "param groups": GROUPS,
    "zero_grad": ZERO_GRAD,
    "dropout": DROPOUT,
}
CATALOGUE = {
    "ppo_mpi.py": MLP,
    "ppo_continuous.py": MLP
    | {  # its width and nonlinearity are flags (--hidden-size, --activation): the layers read `hidden` and `act`
        "relu": [("act(),", "nn.ReLU(),")],
        "dropout": [("act(),", "act(), nn.Dropout(0.1),")],
        "layernorm": [tuple(f.replace(", 64)", ", hidden)").replace("(64)", "(hidden)") for f in MLP["layernorm"][0])],
        "wide": [("hidden_size: int = 64", "hidden_size: int = 256")],
        "shared trunk": [
            tuple(f.replace(", 64)", ", hidden)").replace("(64, ", "(hidden, ") for f in change)
            for change in MLP["shared trunk"]
        ],
        "features": [
            ("    def features(self, x):\n        return x\n", f"    def features(self, x):\n        return {SYMLOG}\n")
        ],
        "zero-init branch": [
            MLP["zero-init branch"][0],
            (
                "    def features(self, x):\n        return x\n",
                "    def features(self, x):\n        return x + self.branch(x)\n",
            ),
        ],
    },
    "ppo_atari.py": {
        "layernorm": [
            ("layer_init(nn.Linear(conv_size, 512)), ", "layer_init(nn.Linear(conv_size, 512)), nn.LayerNorm(512), ")
        ],
        "features": [("self.network(x / 255)", "self.network(x / 127.5 - 1)")],
        "adamw": ADAMW,
        "param groups": [
            (
                "torch.optim.Adam(agent.parameters(),",
                'torch.optim.Adam([{"params": agent.network.parameters()}, '
                '{"params": [*agent.actor.parameters(), *agent.critic.parameters()], "lr": 1e-3}],',
            )
        ],
        "zero_grad": ZERO_GRAD,
    },
}
# A few iterations of each script, on its smallest task; update_epochs 2 so that approx_kl measures the first epoch's
# steps (it is exactly 0 where the optimizer moved nothing).
SHORT = dict(num_steps=32, num_minibatches=2, update_epochs=2, eval_episodes=0)
RUNS = {
    "ppo_mpi.py": dict(SHORT, total_timesteps=512),
    "ppo_continuous.py": dict(SHORT, env_id="Pendulum-v1", total_timesteps=256),
    "ppo_atari.py": dict(SHORT, num_envs=2, num_steps=16, total_timesteps=128),
}
CASES = [(script, edit) for script, edits in CATALOGUE.items() for edit in edits]


def edited_copy(script: str, edit: str, folder: Path):
    """The script with the edit applied, written to folder and imported under a name of its own."""
    source = (REPO / script).read_text()
    for old, new in CATALOGUE[script][edit]:
        assert old in source, f"the catalogue's edit {edit!r} no longer applies to {script}: {old!r}"
        source = source.replace(old, new)
    path = folder / script
    path.write_text(source)
    name = f"edited_{script[:-3]}_{edit.replace(' ', '_')}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run(module, script: str, **kwargs):
    args = module.Args(**kwargs)
    if script == "ppo_mpi.py":
        from mpi4py import MPI

        return module.main(args, MPI.COMM_WORLD)
    return module.main(args)


@pytest.mark.parametrize("script, edit", CASES)
def test_edited_copy_trains_or_stops_with_one_line(script, edit, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    module = edited_copy(script, edit, tmp_path)
    try:
        run(module, script, **RUNS[script])
    except module.UserError as e:
        message = str(e)
        assert edit == "dropout" and "\n" not in message and "another policy than the one trained" in message
        return
    assert edit != "dropout", "a rollout with a random layer trained on: the guard did not stop it"
    (run_dir,) = (tmp_path / "runs").iterdir()
    scalars = read_scalars(run_dir)
    approx_kl = [value for _, value in scalars["losses/approx_kl"]]
    assert all(np.isfinite(approx_kl)) and min(approx_kl) > 0, f"the optimizer moved nothing: approx_kl {approx_kl}"
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) <= 2  # at most the device's and the rollout's one-line notices
