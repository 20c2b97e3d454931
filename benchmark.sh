#!/usr/bin/env bash
# Reproduce the published learning curves: runs scripts x tasks x seeds, then writes a report (markdown tables and
# PNG learning curves beside the published figures of benchmark/published.csv).
#
#   ./benchmark.sh --preset quick                      # ~20 min on 2 cores; says whether the scripts still learn
#   ./benchmark.sh --preset classic --seeds 5 --workers 2
#   ./benchmark.sh --preset mujoco --dry-run           # print the commands only
#   ./benchmark.sh --preset mujoco --tasks 'Hopper|Walker'   # only the tasks that match this regular expression
#   ./benchmark.sh --preset mujoco --only 'tuned'      # only the runs whose "TASK, SCRIPT [xRANKS] [VARIANT]" matches
#   ./benchmark.sh --preset classic -- --num-envs 8    # flags after -- go to every script
#
# Each run lives in OUT/PRESET/TASK/SCRIPT/seedN/ (its log, its runs/ folder, a `done` file with its wall time);
# OUT/PRESET/TASK/SCRIPT/spec names the task, script, env id and steps for the report, which adds summary.json to
# each finished run (git keeps spec, done and summary.json: a fresh clone reports those runs and skips them).
# Finished runs are skipped when the benchmark is run again; a failed run is reported with its log and makes the
# exit status non-zero once every run has ended.
set -euo pipefail

usage() {
  sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"
  echo "Options: --preset quick|classic|mujoco|atari|recurrent|masking|bc|mpi|pbt  --seeds N (3)  --workers N (1)"
  echo "         --tasks REGEX (all)  --only REGEX (all)  --out DIR (benchmark/results)  --python PATH (.venv/bin/python)  --dry-run  -- FLAGS"
}

repo=$(cd "$(dirname "$0")" && pwd)
preset="" tasks="" only="" seeds=3 workers=1 out="$repo/benchmark/results" dry_run=0 extra=()
python="$repo/.venv/bin/python"
[[ -x $python ]] || python=python3
while (($#)); do
  case $1 in
    --preset) preset=$2; shift 2 ;;
    --seeds) seeds=$2; shift 2 ;;
    --tasks) tasks=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --workers) workers=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ $seeds =~ ^[1-9][0-9]*$ ]] || { echo "error: --seeds $seeds must be a positive integer" >&2; exit 2; }
[[ $workers =~ ^[1-9][0-9]*$ ]] || { echo "error: --workers $workers must be a positive integer" >&2; exit 2; }
# runs side by side share the cores: each gets its share of them for torch's threads (an OMP_NUM_THREADS set wins)
if ((workers > 1)); then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(($(nproc) > workers ? $(nproc) / workers : 1))}; fi
# MPI runs use MPICH's mpiexec from the same venv as python (requirements.txt): a system one may be another MPI's.
mpiexec=$(dirname "$python")/mpiexec
[[ -x $mpiexec ]] || mpiexec=mpiexec

# RL Zoo's tuned recurrent PPO settings for its velocity-masked tasks (hyperparams/ppo_lstm.yml: CartPoleNoVel-v1,
# PendulumNoVel-v1, LunarLanderNoVel-v2, MountainCarContinuousNoVel-v0; the envs in benchmark/pomdp.py), given to the
# recurrent script and, for comparison, to a feed-forward one. ppo_lstm.py's defaults are CartPoleNoVel's settings;
# Pendulum and LunarLander replay sequences of 64 steps (--seq-len). RL Zoo explores Pendulum and MountainCarContinuous
# by gSDE and normalises Pendulum's observations and rewards: ppo_lstm.py does neither (see its report).
CARTPOLE_NOVEL="--num-envs 8 --num-steps 32 --num-minibatches 1 --update-epochs 20 --learning-rate 1e-3 --gamma 0.98 --gae-lambda 0.8 --ent-coef 0"
PENDULUM_NOVEL="--num-envs 4 --num-steps 1024 --num-minibatches 64 --update-epochs 10 --learning-rate 1e-3 --gamma 0.9 --gae-lambda 0.95 --ent-coef 0"
LUNARLANDER_NOVEL="--num-envs 16 --num-steps 1024 --num-minibatches 256 --update-epochs 4 --gamma 0.999 --gae-lambda 0.98 --ent-coef 0.01"
# MountainCarContinuous: RL Zoo's settings with 8 envs x 32 steps (for speed; RL Zoo: 1 env x 8).
MOUNTAINCAR_NOVEL="--num-envs 8 --num-steps 32 --num-minibatches 1 --update-epochs 10 --learning-rate 7.77e-5 --gamma 0.9999 --gae-lambda 0.9 --ent-coef 0.00429 --clip-coef 0.1 --max-grad-norm 5 --vf-coef 0.19 --no-anneal-lr"
CARTPOLE_LSTM=""
PENDULUM_LSTM="$PENDULUM_NOVEL --seq-len 64"
LUNARLANDER_LSTM="$LUNARLANDER_NOVEL --seq-len 64"
MOUNTAINCAR_LSTM="$MOUNTAINCAR_NOVEL"

# MuJoCo: the rows without a variant run CleanRL's settings (the script's defaults); `tuned` runs Tianshou's PPO recipe
# (examples/mujoco/mujoco_ppo.py: 8 envs x 256 steps, minibatches of 64, 10 epochs, advantages recomputed before each
# epoch and not normalised, no value clipping, value coefficient 0.25, no entropy bonus, initial log-std -0.5).
# ppo_gsde.py's `tuned` rows: the same recipe exploring by gSDE with that script's defaults, noise weights redrawn every
# 4 steps (RL Zoo's PyBullet entries) from a log-std of -2: over 64 tanh features that starts each action's std near
# the Gaussian's exp(-0.5).
MUJOCO_RECIPE="--num-envs 8 --num-steps 256 --num-minibatches 32 --update-epochs 10 --learning-rate 3e-4 --ent-coef 0 --vf-coef 0.25 --no-clip-vloss --no-norm-adv --recompute-adv"
MUJOCO_TUNED="$MUJOCO_RECIPE --log-std-init -0.5"
# `tuned ReLU` changes one flag of the tuned recipe: ReLU units.
# Humanoid's actions are bounded by +-0.4, the other tasks' by +-1. Tianshou's policy acts in [-1, 1], scaled onto the
# bounds, so its initial std, exp(-0.5), is exp(-1.4) in Humanoid's units: `tuned log-std -1.4` starts there.
HUMANOID_TUNED="$MUJOCO_RECIPE --log-std-init -1.4"
# `SB3 gSDE`: RL Zoo's gSDE entries for the PyBullet tasks (hyperparams/ppo.yml, the settings behind SB3's gSDE table):
# 16 envs x 512 steps, minibatches of 128, 20 epochs, constant learning rate 3e-5, clip 0.4, lambda 0.9, noise weights
# redrawn every 4 steps, ReLU 256x256. RL Zoo starts from a log-std of -2 with torch's default initialisation; the
# scripts' orthogonal one makes the latent features larger, so -2.5 starts near RL Zoo's initial action std.
MUJOCO_SB3_GSDE="--num-envs 16 --num-steps 512 --num-minibatches 64 --update-epochs 20 --learning-rate 3e-5 --no-anneal-lr --gae-lambda 0.9 --ent-coef 0 --clip-coef 0.4 --vf-coef 0.5 --no-clip-vloss --sde-sample-freq 4 --log-std-init -2.5 --activation relu --hidden-size 256"

# Population-based training against a grid (ppo_pbt.py, 4 ranks): 4 members from learning rates spread over 1e-5..1e-2
# (one per quarter of the range's decades: 2.4e-5, 1.3e-4, 7.5e-4, 4.2e-3), the other hyperparameters fixed at
# ppo.py's values; the grid is the same population without evolution (--evolve-interval 0), the same steps in all.
PBT_LEARNING_RATES="--learning-rate 1e-5 1e-2 --ent-coef 0.01 0.01 --clip-coef 0.2 0.2 --gae-lambda 0.95 0.95 --update-epochs 4 4"

# Behaviour cloning (ppo_bc.py) clones the greedy episodes of the classic preset's CartPole expert, beside PPO from
# scratch for the same steps.
CARTPOLE_EXPERT=$(ls "$out"/classic/CartPole-v1/ppo.py/seed1/runs/*/checkpoint.pt 2>/dev/null | head -n 1 || true)

# One run spec per line: task | script | env id | total steps | MPI ranks (0: no mpiexec) | flags | variant (a label
# that tells apart two runs of one script on one task, e.g. with and without a flag)
case $preset in
  quick) specs="
CartPole-v1|ppo.py|CartPole-v1|500000|0|
Acrobot-v1|ppo.py|Acrobot-v1|500000|0|
HalfCheetah-v4|ppo_continuous.py|HalfCheetah-v4|300000|0|
CartPole-v1 velocity masked|ppo_lstm.py|benchmark.pomdp:CartPoleNoVel-v1|100000|0|$CARTPOLE_LSTM
CartPole-v1 velocity masked|ppo.py|benchmark.pomdp:CartPoleNoVel-v1|100000|0|$CARTPOLE_NOVEL" ;;
  classic) specs="
CartPole-v1|ppo.py|CartPole-v1|500000|0|
Acrobot-v1|ppo.py|Acrobot-v1|500000|0|
MountainCar-v0|ppo.py|MountainCar-v0|500000|0|" ;;
  mujoco) specs="
HalfCheetah-v4|ppo_continuous.py|HalfCheetah-v4|1000000|0|
Hopper-v4|ppo_continuous.py|Hopper-v4|1000000|0|
Walker2d-v4|ppo_continuous.py|Walker2d-v4|1000000|0|
Ant-v4|ppo_continuous.py|Ant-v4|1000000|0|
Humanoid-v4|ppo_continuous.py|Humanoid-v4|1000000|0|
HalfCheetah-v4|ppo_continuous.py|HalfCheetah-v4|1000000|0|$MUJOCO_TUNED --activation relu|tuned ReLU
Hopper-v4|ppo_continuous.py|Hopper-v4|1000000|0|$MUJOCO_TUNED|tuned
Walker2d-v4|ppo_continuous.py|Walker2d-v4|1000000|0|$MUJOCO_TUNED|tuned
Ant-v4|ppo_continuous.py|Ant-v4|1000000|0|$MUJOCO_TUNED|tuned
Humanoid-v4|ppo_continuous.py|Humanoid-v4|1000000|0|$HUMANOID_TUNED|tuned log-std -1.4
HalfCheetah-v4|ppo_gsde.py|HalfCheetah-v4|1000000|0|$MUJOCO_RECIPE|tuned
Hopper-v4|ppo_gsde.py|Hopper-v4|1000000|0|$MUJOCO_RECIPE|tuned
Walker2d-v4|ppo_gsde.py|Walker2d-v4|1000000|0|$MUJOCO_RECIPE|tuned
HalfCheetah-v4|ppo_gsde.py|HalfCheetah-v4|1000000|0|$MUJOCO_SB3_GSDE|SB3 gSDE" ;;
  atari) specs="
Breakout-v5 1M|ppo_atari.py|Breakout-v5|1000000|0|--eval-episodes 10
Pong-v5|ppo_atari.py|Pong-v5|10000000|0|--eval-episodes 0
Breakout-v5|ppo_atari.py|Breakout-v5|10000000|0|--eval-episodes 0
BeamRider-v5|ppo_atari.py|BeamRider-v5|10000000|0|--eval-episodes 0" ;;
  recurrent) specs="
CartPole-v1 velocity masked|ppo_lstm.py|benchmark.pomdp:CartPoleNoVel-v1|100000|0|$CARTPOLE_LSTM
CartPole-v1 velocity masked|ppo.py|benchmark.pomdp:CartPoleNoVel-v1|100000|0|$CARTPOLE_NOVEL
CartPole-v1 velocity masked 200k|ppo_lstm.py|benchmark.pomdp:CartPoleNoVel-v1|200000|0|
Pendulum-v1 velocity masked|ppo_lstm.py|benchmark.pomdp:PendulumNoVel-v1|100000|0|$PENDULUM_LSTM
Pendulum-v1 velocity masked|ppo_continuous.py|benchmark.pomdp:PendulumNoVel-v1|100000|0|$PENDULUM_NOVEL
LunarLander-v3 velocity masked|ppo_lstm.py|benchmark.pomdp:LunarLanderNoVel-v3|1000000|0|$LUNARLANDER_LSTM
LunarLander-v3 velocity masked|ppo.py|benchmark.pomdp:LunarLanderNoVel-v3|1000000|0|$LUNARLANDER_NOVEL
MountainCarContinuous-v0 velocity masked|ppo_lstm.py|benchmark.pomdp:MountainCarContinuousNoVel-v0|300000|0|$MOUNTAINCAR_LSTM
MountainCarContinuous-v0 velocity masked|ppo_continuous.py|benchmark.pomdp:MountainCarContinuousNoVel-v0|300000|0|$MOUNTAINCAR_NOVEL" ;;
  masking) specs="
Taxi-v4|ppo_masked.py|Taxi-v4|500000|0|
Taxi-v4|ppo_masked.py|Taxi-v4|500000|0|--no-action-mask|--no-action-mask
ConnectFour-v0|ppo_masked.py|benchmark.masked_tasks:ConnectFour-v0|500000|0|
ConnectFour-v0|ppo_masked.py|benchmark.masked_tasks:ConnectFour-v0|500000|0|--no-action-mask|--no-action-mask
MaskedCueRecall-v0|ppo_lstm_masked.py|benchmark.masked_tasks:MaskedCueRecall-v0|50000|0|
MaskedCueRecall-v0|ppo_lstm_masked.py|benchmark.masked_tasks:MaskedCueRecall-v0|50000|0|--no-action-mask|--no-action-mask
MaskedCueRecall-v0|ppo_masked.py|benchmark.masked_tasks:MaskedCueRecall-v0|50000|0|" ;;
  mpi) specs="
HalfCheetah-v4 tuned ReLU, global batch 8x256|ppo_mpi.py|HalfCheetah-v4|1000000|1|$MUJOCO_TUNED --activation relu
HalfCheetah-v4 tuned ReLU, global batch 8x256|ppo_mpi.py|HalfCheetah-v4|1000000|2|$MUJOCO_TUNED --activation relu --num-envs 4
Breakout-v5 1M, global batch 8x128|ppo_atari_mpi.py|Breakout-v5|1000000|2|--num-envs 4 --eval-episodes 10" ;;
  pbt) specs="
Acrobot-v1 learning rates 1e-5..1e-2|ppo_pbt.py|Acrobot-v1|200000|4|$PBT_LEARNING_RATES|PBT
Acrobot-v1 learning rates 1e-5..1e-2|ppo_pbt.py|Acrobot-v1|200000|4|$PBT_LEARNING_RATES --evolve-interval 0|grid
CartPole-v1 learning rates 1e-5..1e-2|ppo_pbt.py|CartPole-v1|50000|4|$PBT_LEARNING_RATES|PBT
CartPole-v1 learning rates 1e-5..1e-2|ppo_pbt.py|CartPole-v1|50000|4|$PBT_LEARNING_RATES --evolve-interval 0|grid" ;;
  bc) [[ -n $CARTPOLE_EXPERT ]] || { echo "error: --preset bc clones the classic preset's CartPole-v1 expert (ppo.py, seed 1): run ./benchmark.sh --preset classic --tasks CartPole first" >&2; exit 2; }
    specs="
CartPole-v1|ppo_bc.py|CartPole-v1|50000|0|--expert $CARTPOLE_EXPERT
CartPole-v1|ppo.py|CartPole-v1|50000|0|" ;;
  "") echo "error: --preset is required (quick, classic, mujoco, atari, recurrent, masking, bc, mpi or pbt)" >&2; exit 2 ;;
  *) echo "error: --preset $preset is unknown; pick quick, classic, mujoco, atari, recurrent, masking, bc, mpi or pbt" >&2; exit 2 ;;
esac

# run_one DIR CMD...: run CMD in DIR unless DIR holds a finished run; the wall time goes to DIR/done.
run_one() {
  local dir=$1; shift
  local start=$SECONDS
  rm -rf "$dir" && mkdir -p "$dir"
  if (cd "$dir" && "$@" >log.txt 2>&1); then
    echo $((SECONDS - start)) >"$dir/done"
  else
    echo "FAILED (exit $?): $* -- log: $dir/log.txt" >&2
    touch "$dir/failed"
    return 1
  fi
}

failures=0
# `wait -n` returns the status of the run that ended; a failure is counted, never swallowed.
reap() { wait -n && return 0; failures=$((failures + 1)); }
while IFS='|' read -r task script env steps ranks flags variant; do
  [[ -n $task ]] || continue
  [[ -z $tasks || $task =~ $tasks ]] || continue
  label=$script
  launch=("$python" "$repo/$script")
  if ((ranks > 0)); then label="$script x$ranks" launch=("$mpiexec" -n "$ranks" "${launch[@]}"); fi
  label+=${variant:+ $variant}
  [[ -z $only || "$task, $label" =~ $only ]] || continue
  for seed in $(seq 1 "$seeds"); do
    dir="$out/$preset/${task// /_}/${label// /_}/seed$seed"
    # shellcheck disable=SC2086  # $flags holds several words on purpose
    cmd=("${launch[@]}" --env-id "$env" --total-timesteps "$steps" --seed "$seed" $flags "${extra[@]}")
    if ((dry_run)); then echo "(cd $dir && ${cmd[*]})"; continue; fi
    if [[ -f $dir/done ]]; then echo "done already: $task, $label, seed $seed"; continue; fi
    [[ -f $repo/$script ]] || { echo "FAILED: $script does not exist yet ($task, seed $seed)" >&2; failures=$((failures + 1)); continue; }
    while (($(jobs -rp | wc -l) >= workers)); do reap; done
    echo "start: $task, $label, seed $seed"
    mkdir -p "$dir" && printf '%s\n' "$task" "$label" "$env" "$steps" >"$(dirname "$dir")/spec"
    run_one "$dir" "${cmd[@]}" </dev/null &  # no stdin: mpiexec would swallow the rest of the specs
  done
done <<<"$specs"
((dry_run)) && exit 0
while (($(jobs -rp | wc -l) > 0)); do reap; done

"$python" "$repo/benchmark/report.py" "$out/$preset"
if ((failures)); then
  echo "$failures run(s) failed: see the FAILED lines above" >&2
  exit 1
fi
