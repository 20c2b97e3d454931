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


class DictObsToy(gym.Env):
    """An observation space that ppo.py does not take."""

    observation_space = gym.spaces.Dict({"a": gym.spaces.Box(-1, 1, (2,)), "b": gym.spaces.Discrete(3)})
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


class BoxActionToy(gym.Env):
    """Continuous actions in a 2-D layout with unequal bounds, 2-D observations. Reward: minus the distance of the
    action from a target, which the observation gives."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2, 2), np.float32)
    action_space = gym.spaces.Box(np.array([[-1, 0], [2, -5]], np.float32), np.array([[1, 0.5], [3, 5]], np.float32))

    def _obs(self):
        self.target = self.np_random.uniform(self.action_space.low, self.action_space.high).astype(np.float32)
        scale = (self.action_space.high - self.action_space.low) / 2
        return ((self.target - self.action_space.low) / scale - 1).astype(np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self._obs(), {}

    def step(self, action):
        assert self.action_space.contains(np.asarray(action, dtype=self.action_space.dtype)), action
        reward = -float(np.abs(np.asarray(action) - self.target).sum())
        return self._obs(), reward, False, False, {}


for _cls in (MultiDiscreteToy, MultiBinaryToy, OffsetDiscreteToy, DictObsToy, BoxActionToy):
    gym.register(id=f"{_cls.__name__}-v0", entry_point=f"{__name__}:{_cls.__name__}", max_episode_steps=16)
