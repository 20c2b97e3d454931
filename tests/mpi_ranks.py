"""What the MPI tests run on ranks.

Imported, as `--env-id tests.mpi_ranks:CrashOnRank1-v0` (CartPole) or `tests.mpi_ranks:PendulumCrashOnRank1-v0`, it
registers envs that fail on rank 1 alone, in the middle of training, and `PendulumPrintsSeeds-v0`, which prints each
seed it is reset with. Run as a script on every rank (`mpiexec -n 2 python tests/mpi_ranks.py`), it checks that
ppo_mpi.py's merge_statistics gives every rank the statistics of all the ranks' data, as NumPy computes them; rank 0
then prints `ok`. A failed check prints its traceback and ends every rank.
"""

import gymnasium as gym
from gymnasium.envs.classic_control.cartpole import CartPoleEnv
from gymnasium.envs.classic_control.pendulum import PendulumEnv

CRASH_AFTER_STEPS = 300


def crash_on_rank1(env_class):
    class CrashOnRank1(env_class):
        """The env of env_class, raising on rank 1 after CRASH_AFTER_STEPS steps: rank 0 is then waiting for rank 1 in
        a collective call, or soon will be."""

        steps = 0

        def step(self, action):
            from mpi4py import MPI  # already initialised by the script that steps this env

            self.steps += 1
            if MPI.COMM_WORLD.rank == 1 and self.steps > CRASH_AFTER_STEPS:
                raise RuntimeError("CrashOnRank1: the env broke on rank 1")
            return super().step(action)

    return CrashOnRank1


CrashOnRank1, PendulumCrashOnRank1 = crash_on_rank1(CartPoleEnv), crash_on_rank1(PendulumEnv)
gym.register(id="CrashOnRank1-v0", entry_point=f"{__name__}:CrashOnRank1", max_episode_steps=500)
gym.register(id="PendulumCrashOnRank1-v0", entry_point=f"{__name__}:PendulumCrashOnRank1", max_episode_steps=200)


class PendulumPrintsSeeds(PendulumEnv):
    """Pendulum, printing `reset seed N;` at each seeded reset: the seeds of every env of every rank, in the output."""

    def reset(self, *, seed=None, options=None):
        if seed is not None:
            print(f"reset seed {seed};", flush=True)  # the ranks' lines may reach mpiexec's output glued
        return super().reset(seed=seed, options=options)


gym.register(id="PendulumPrintsSeeds-v0", entry_point=f"{__name__}:PendulumPrintsSeeds", max_episode_steps=200)


def main() -> None:
    import sys
    import traceback
    from pathlib import Path

    import numpy as np
    from mpi4py import MPI

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import ppo_mpi

    comm = MPI.COMM_WORLD

    def part(merge, rank):  # the data of one rank between two merges: of unequal sizes, a multiple of 4 rows
        return np.random.default_rng([merge, rank]).normal(3.0, 2.0, (4 * (rank + 2 + merge), 2, 3))

    try:
        rms = ppo_mpi.RunningMeanStd(shape=(2, 3))
        prior = (rms.count, rms.mean.copy(), rms.var.copy())
        for merge in range(3):
            for rows in part(merge, comm.rank).reshape(-1, 4, 2, 3):
                rms.update(rows)  # 4 rows at a time, as a rollout of 4 envs updates step by step
            prior = ppo_mpi.merge_statistics(comm, rms, prior)
            expected = ppo_mpi.RunningMeanStd(shape=(2, 3))
            expected.update(np.concatenate([part(m, r) for m in range(merge + 1) for r in range(comm.size)]))
            np.testing.assert_allclose(rms.mean, expected.mean, rtol=1e-9)
            np.testing.assert_allclose(rms.var, expected.var, rtol=1e-9)
            assert abs(rms.count - expected.count) < 1e-9
            assert comm.allgather(rms.var.tobytes()) == [rms.var.tobytes()] * comm.size  # alike on every rank
    except Exception:
        traceback.print_exc()
        comm.Abort(1)
    if comm.rank == 0:
        print("ok")


if __name__ == "__main__":
    main()
