"""Small gymnasium envs for the action and observation spaces that the classic tasks do not cover.

Each registers on import, so a script reaches it as `--env-id tests.toy_envs:NAME` (gymnasium's module syntax).
Every env checks that its actions lie in its action space: a script that sends a wrong layout or offset fails.
"""

import gymnasium as gym
import numpy as np


class MatchEnv(gym.Env):
    """Reward: the fraction of action components that equal a target drawn from the observation. Episodes
    truncate after 16 steps. Subclasses pick the action space; the target has one entry per component."""

    action_space: gym.Space

    def __init__(self):
        self.nvec = self.target_sizes()
        self.observation_space = gym.spaces.Box(0.0, 1.0, (len(self.nvec),), np.float32)

    def target_sizes(self) -> np.ndarray:
        raise NotImplementedError

    def _obs(self):
        return (self.target / self.nvec).astype(np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.target = self.np_random.integers(0, self.nvec)
        return self._obs(), {}

    def step(self, action):
        assert self.action_space.contains(np.asarray(action, dtype=self.action_space.dtype)), action
        reward = float(np.mean(self.to_indices(action) == self.target))
        self.target = self.np_random.integers(0, self.nvec)
        return self._obs(), reward, False, False, {}

    def to_indices(self, action):
        return np.asarray(action).reshape(-1)


class MultiDiscreteToy(MatchEnv):
    """MultiDiscrete actions of unequal sizes, in a 2-D layout."""

    def target_sizes(self):
        self.action_space = gym.spaces.MultiDiscrete([[3, 2], [4, 5]])
        return self.action_space.nvec.reshape(-1)


class MultiBinaryToy(MatchEnv):
    def target_sizes(self):
        self.action_space = gym.spaces.MultiBinary(5)
        return np.full(5, 2)


class OffsetDiscreteToy(MatchEnv):
    """Discrete actions numbered from -1 (gymnasium's `start`)."""

    def target_sizes(self):
        self.action_space = gym.spaces.Discrete(3, start=-1)
        return np.array([3])

    def to_indices(self, action):
        return np.asarray(action).reshape(-1) - self.action_space.start


class MixedObsToy(gym.Env):
    """Every observation space the scripts take, nested: a Dict of a Box, a MultiBinary and a Tuple of a Discrete
    (numbered from 1) and a MultiDiscrete. Reward: 1 when the action names the Discrete entry (counted from 0)."""

    observation_space = gym.spaces.Dict(
        {
            "position": gym.spaces.Box(-1, 1, (2,)),
            "bits": gym.spaces.MultiBinary(3),
            "pair": gym.spaces.Tuple((gym.spaces.Discrete(3, start=1), gym.spaces.MultiDiscrete([2, 4]))),
        }
    )
    action_space = gym.spaces.Discrete(3)

    def _obs(self):
        obs = self.observation_space.sample()
        self.target = int(obs["pair"][0]) - 1
        return obs

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.observation_space.seed(int(self.np_random.integers(2**31)))
        return self._obs(), {}

    def step(self, action):
        assert self.action_space.contains(np.asarray(action, dtype=self.action_space.dtype)), action
        return self._obs(), float(action == self.target), False, False, {}


class NaNDiscreteToy(MatchEnv):
    """Discrete actions; the observation turns NaN from its 200th step on (resets included): a broken env."""

    def target_sizes(self):
        self.action_space, self.steps = gym.spaces.Discrete(3), 0
        return np.array([3])

    def _obs(self):
        self.steps += 1
        return np.full(1, np.nan, np.float32) if self.steps >= 200 else super()._obs()


class MaskedToy(MatchEnv):
    """MultiDiscrete [4, 3] actions under a random action mask per step (info["action_mask"], flat over the components,
    at least one action allowed in each); the target is always allowed. A masked action counts in `violations` (of
    every instance in the process) instead of failing, so that a run with --no-action-mask shows them."""

    violations, strict = 0, False  # strict: a masked action raises (seen from another process, e.g. an MPI rank)

    def target_sizes(self):
        self.action_space = gym.spaces.MultiDiscrete([4, 3])
        return self.action_space.nvec

    def _masked(self, obs):
        mask = self.np_random.random(self.nvec.sum()) < 0.5
        mask[np.cumsum(self.nvec) - self.nvec + self.target] = True
        self.mask = mask.astype(np.int8)
        return obs, {"action_mask": self.mask}

    def reset(self, *, seed=None, options=None):
        return self._masked(super().reset(seed=seed)[0])

    def step(self, action):
        flat = np.cumsum(self.nvec) - self.nvec + np.asarray(action)
        if (self.mask[flat] == 0).any():
            MaskedToy.violations += 1
            if self.strict:
                raise ValueError(f"MaskedToy: action {action} is masked out by {self.mask}")
        obs, reward, terminated, truncated, _ = super().step(action)
        obs, info = self._masked(obs)
        return obs, reward, terminated, truncated, info


class MaskedDictToy(MaskedToy):
    """MaskedToy with the mask in the observation, PettingZoo's way: {"observation": ..., "action_mask": ...}."""

    def __init__(self):
        super().__init__()
        mask_space = gym.spaces.MultiBinary(int(self.nvec.sum()))
        self.observation_space = gym.spaces.Dict({"observation": self.observation_space, "action_mask": mask_space})

    def _masked(self, obs):
        obs, info = super()._masked(obs)
        return {"observation": obs, "action_mask": info["action_mask"]}, {}


class StrictMaskedToy(MaskedToy):
    strict = True


toys = (MultiDiscreteToy, MultiBinaryToy, OffsetDiscreteToy, MixedObsToy, NaNDiscreteToy)
for _cls in (*toys, MaskedToy, MaskedDictToy, StrictMaskedToy):
    gym.register(id=f"{_cls.__name__}-v0", entry_point=f"{__name__}:{_cls.__name__}", max_episode_steps=16)


# ---------------------------------------------------------------- for ppo_lstm.py: memory


class CueRecallToy(gym.Env):
    """A task that needs memory. The first observation shows a cue (one of two), the next DELAY observations are
    blank, the last asks for the cue: the action then earns +1 if it names the cue, -1 if not (0 on every other step)
    and the episode terminates. The query looks the same whatever the cue, so a policy without memory is right half
    the time at best: its expected return is 0, that of a policy that remembers the cue 1."""

    DELAY = 6
    observation_space = gym.spaces.Box(0.0, 1.0, (3,), np.float32)  # [cue 0, cue 1, query]
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.cue, self.t = int(self.np_random.integers(2)), 0
        return np.eye(3, dtype=np.float32)[self.cue], {}

    def step(self, action):
        assert self.action_space.contains(action), action
        self.t += 1
        if self.t <= self.DELAY:
            obs = np.eye(3, dtype=np.float32)[2] if self.t == self.DELAY else np.zeros(3, np.float32)
            return obs, 0.0, False, False, {}
        return np.zeros(3, np.float32), 1.0 if action == self.cue else -1.0, True, False, {}


for _cls in (CueRecallToy,):
    gym.register(id=f"{_cls.__name__}-v0", entry_point=f"{__name__}:{_cls.__name__}", max_episode_steps=16)
