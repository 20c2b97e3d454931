#!/usr/bin/env bash
# The GPU check, at most ~5 minutes on a machine with a CUDA GPU and a Python whose torch is the CUDA build of
# requirements.txt's version (with the rest of requirements.txt installed beside it):
#   1. every script trains briefly with --cuda (the guard checks each update: rollout and update agree on the GPU);
#   2. a checkpoint written on the GPU is evaluated and resumed on the CPU (and one from the CPU on the GPU);
#   3. ppo_atari.py against CleanRL's ppo_atari_envpool.py, same settings, alternated, if CLEANRL_ATARI names it
#      (CleanRL's file is not part of this project: fetch it yourself; it needs `gym` installed beside envpool).
#
#   PYTHON=.venv/bin/python CLEANRL_ATARI=/path/to/ppo_atari_envpool.py benchmark/device_check.sh [OUT_DIR]
#
# Prints one line per check and the steps/s of each timed run; exits non-zero if a check fails.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
case $PYTHON in */*) PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" ;; esac  # each check cds
OUT=${1:-$(mktemp -d)}
mkdir -p "$OUT"
export WANDB_MODE=offline PYTHONUNBUFFERED=1
failed=0

check() {  # check NAME COMMAND...: run it in its own folder under $OUT, report pass/fail and its last line
  local name=$1
  shift
  mkdir -p "$OUT/$name"
  if (cd "$OUT/$name" && "$@") >"$OUT/$name/log" 2>&1; then
    echo "ok   $name: $(grep -E '^(done|eval)' "$OUT/$name/log" | tail -n 1)"
  else
    echo "FAIL $name (see $OUT/$name/log):"
    tail -n 5 "$OUT/$name/log" | sed 's/^/     /'
    failed=1
  fi
}
here=$PWD
"$PYTHON" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print("GPU:", torch.cuda.get_device_name())' \
  || exit 1

# 1. every script on the GPU, a few iterations
check ppo "$PYTHON" "$here/ppo.py" --cuda --total-timesteps 4096 --eval-episodes 2
check ppo_continuous "$PYTHON" "$here/ppo_continuous.py" --cuda --env-id Pendulum-v1 --num-steps 512 \
  --total-timesteps 4096 --eval-episodes 2
check ppo_atari "$PYTHON" "$here/ppo_atari.py" --cuda --total-timesteps 8192 --eval-episodes 1
check ppo_lstm "$PYTHON" "$here/ppo_lstm.py" --cuda --total-timesteps 4096 --eval-episodes 2
check ppo_lstm_atari "$PYTHON" "$here/ppo_lstm.py" --cuda --env-id Breakout-v5 --num-envs 8 --total-timesteps 8192 \
  --eval-episodes 1
check ppo_mpi "$here/.venv/bin/mpiexec" -n 2 "$PYTHON" "$here/ppo_mpi.py" --cuda --total-timesteps 4096 \
  --eval-episodes 2

# 2. checkpoints across devices: the GPU's evaluated and resumed on the CPU, the CPU's evaluated on the GPU
gpu_ckpt=$(ls "$OUT"/ppo_atari/runs/*/checkpoint.pt 2>/dev/null | head -n 1)
if [ -n "$gpu_ckpt" ]; then
  check atari_gpu_to_cpu_eval "$PYTHON" "$here/ppo_atari.py" --no-cuda --eval-checkpoint "$gpu_ckpt" --eval-episodes 1
  check atari_gpu_to_cpu_resume "$PYTHON" "$here/ppo_atari.py" --no-cuda --resume "$gpu_ckpt" \
    --total-timesteps 10240 --eval-episodes 0
fi
check ppo_cpu "$PYTHON" "$here/ppo.py" --total-timesteps 2048 --eval-episodes 0
cpu_ckpt=$(ls "$OUT"/ppo_cpu/runs/*/checkpoint.pt 2>/dev/null | head -n 1)
[ -n "$cpu_ckpt" ] && check ppo_cpu_to_gpu_eval "$PYTHON" "$here/ppo.py" --cuda --eval-checkpoint "$cpu_ckpt" \
  --eval-episodes 2

# 3. ppo_atari.py against CleanRL on Breakout, same settings (8 envs x 128 steps, 4 minibatches, 4 epochs), alternated
if [ -n "${CLEANRL_ATARI:-}" ]; then
  for round in 1 2; do
    check "speed_ppo_atari_$round" "$PYTHON" "$here/ppo_atari.py" --total-timesteps 65536 --eval-episodes 0
    check "speed_cleanrl_$round" "$PYTHON" "$CLEANRL_ATARI" --total-timesteps 65536
    echo "     CleanRL SPS: $(grep -o 'SPS: [0-9]*' "$OUT/speed_cleanrl_$round/log" | tail -n 1)"
  done
else
  echo "skip speed against CleanRL: set CLEANRL_ATARI to its ppo_atari_envpool.py"
fi
exit $failed
