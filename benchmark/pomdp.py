"""Velocity-masked classic control tasks, RL Zoo's partially observable `*NoVel` envs: the velocities in the
observation are zeroed, so a policy must infer them from what it remembers (ppo_lstm.py's benchmark tasks).

Importing this module registers them; any script takes them through gymnasium's `module:EnvId` syntax:

    python ppo_lstm.py --env-id benchmark.pomdp:CartPoleNoVel-v1
"""

import gymnasium as gym
import numpy as np

# The velocity entries of each observation, as RL Zoo's MaskVelocityWrapper: CartPole's cart and pole velocities,
# Pendulum's angular velocity, Acrobot's two angular ones, MountainCar's, LunarLander's x, y and angular velocities.
VELOCITY_ENTRIES = {
    "CartPole-v1": [1, 3],
    "Pendulum-v1": [2],
    "Acrobot-v1": [4, 5],
    "MountainCar-v0": [1],
    "MountainCarContinuous-v0": [1],
    "LunarLander-v3": [2, 3, 5],
    "LunarLanderContinuous-v3": [2, 3, 5],
}


class MaskVelocity(gym.ObservationWrapper):
    def __init__(self, env: gym.Env, entries: list[int]):
        super().__init__(env)
        self.mask = np.ones(env.observation_space.shape, dtype=env.observation_space.dtype)
        self.mask[entries] = 0

    def observation(self, observation):
        return observation * self.mask


def make_masked(env_id: str, **kwargs) -> gym.Env:
    return MaskVelocity(gym.make(env_id, **kwargs), VELOCITY_ENTRIES[env_id])


for _env_id in VELOCITY_ENTRIES:
    _name, _, _version = _env_id.rpartition("-")
    gym.register(f"{_name}NoVel-{_version}", entry_point=make_masked, kwargs={"env_id": _env_id})
