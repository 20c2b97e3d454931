"""Tasks with action masks for the benchmark, beside gymnasium's Taxi (whose mask comes in info["action_mask"]).

ConnectFour-v0 gives its mask the PettingZoo way, in a Dict observation {"observation": ..., "action_mask": ...};
MaskedCueRecall-v0, a task that needs memory as well as masks (ppo_lstm_masked.py's), in info["action_mask"].
Importing this module registers it, so a script reaches it as `--env-id benchmark.masked_tasks:ConnectFour-v0`
(run from the repository's root, or with it on PYTHONPATH).
"""

import gymnasium as gym
import numpy as np

ROWS, COLUMNS = 6, 7


class ConnectFour(gym.Env):
    """Connect Four against an opponent that drops its disc in a uniformly random open column; the agent moves first.
    Observation: the board from the agent's side (+1 its discs, -1 the opponent's, 0 empty; row 0 at the top) and
    the columns still open. Reward +1 for a win, -1 for a loss, 0 for a draw. A disc dropped into a full column (only
    possible without the mask) ends the episode as a loss, as PettingZoo's games end an illegal move."""

    observation_space = gym.spaces.Dict(
        {
            "observation": gym.spaces.Box(-1.0, 1.0, (ROWS, COLUMNS), np.float32),
            "action_mask": gym.spaces.MultiBinary(COLUMNS),
        }
    )
    action_space = gym.spaces.Discrete(COLUMNS)

    def _obs(self) -> dict:
        return {"observation": self.board.copy(), "action_mask": (self.board[0] == 0).astype(np.int8)}

    def _drop(self, column: int, disc: float) -> bool:
        """Drop a disc into an open column; True if it connects four."""
        row = int(np.flatnonzero(self.board[:, column] == 0)[-1])
        self.board[row, column] = disc
        for dr, dc in ((0, 1), (1, 0), (1, 1), (1, -1)):
            count = 1
            for sign in (1, -1):
                r, c = row + sign * dr, column + sign * dc
                while 0 <= r < ROWS and 0 <= c < COLUMNS and self.board[r, c] == disc:
                    count, r, c = count + 1, r + sign * dr, c + sign * dc
            if count >= 4:
                return True
        return False

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.board = np.zeros((ROWS, COLUMNS), np.float32)
        return self._obs(), {}

    def step(self, action):
        column = int(action)
        if self.board[0, column] != 0:  # a full column
            return self._obs(), -1.0, True, False, {}
        if self._drop(column, 1.0):
            return self._obs(), 1.0, True, False, {}
        if not (self.board[0] == 0).any():
            return self._obs(), 0.0, True, False, {}
        if self._drop(int(self.np_random.choice(np.flatnonzero(self.board[0] == 0))), -1.0):
            return self._obs(), -1.0, True, False, {}
        return self._obs(), 0.0, not (self.board[0] == 0).any(), False, {}


class MaskedCueRecall(gym.Env):
    """Remember a cue, answer when asked. The first observation shows one of CUES cues; the next DELAY are blank but
    for the last, which asks for the cue. Until the question only action 0 (wait) is allowed, at the question only the
    answers 1..CUES: naming the cue pays +1, another -1, and the episode ends. A forbidden action (possible only
    without the mask) ends it with -1. The question looks the same whatever the cue, so a policy without memory is
    right 1 time in CUES (expected return -0.5 for 4 cues); one that remembers, always (1)."""

    CUES, DELAY = 4, 8
    observation_space = gym.spaces.Box(0.0, 1.0, (CUES + 1,), np.float32)  # the cue one-hot, then the question
    action_space = gym.spaces.Discrete(CUES + 1)

    def _step_out(self, obs_index: int | None, asking: bool, reward: float = 0.0, terminated: bool = False):
        obs = np.zeros(self.CUES + 1, np.float32)
        if obs_index is not None:
            obs[obs_index] = 1
        mask = np.arange(self.CUES + 1) > 0 if asking else np.arange(self.CUES + 1) == 0
        self.asking = asking
        return obs, reward, terminated, False, {"action_mask": mask.astype(np.int8)}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.cue, self.t = int(self.np_random.integers(self.CUES)), 0
        obs, *_, info = self._step_out(self.cue, asking=False)
        return obs, info

    def step(self, action):
        self.t += 1
        if self.asking:
            return self._step_out(None, False, 1.0 if action == self.cue + 1 else -1.0, terminated=True)
        if action != 0:  # an answer before the question
            return self._step_out(None, False, -1.0, terminated=True)
        return self._step_out(self.CUES if self.t == self.DELAY else None, asking=self.t == self.DELAY)


gym.register(id="ConnectFour-v0", entry_point=f"{__name__}:ConnectFour")
gym.register(id="MaskedCueRecall-v0", entry_point=f"{__name__}:MaskedCueRecall")
