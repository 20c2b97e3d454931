#!/usr/bin/env bash
# Steady steps/s of several programs on this machine, alternated in rounds (A B C, A B C, ...) so that a drift in
# the machine's speed hits every program alike. Prints a markdown table (also written to OUT/table.md): steps/s of
# each program in each round, their median, and per round the ratio first/other (>1: the first one is faster).
#
#   benchmark/speed.sh [--rounds N (3)] [--steps N (200000)] [--out DIR (/tmp/speed)] -- NAME1 'CMD1' NAME2 'CMD2' ...
#
#   benchmark/speed.sh --rounds 3 --steps 200000 -- \
#     ours    '.venv/bin/python ppo.py --env-id CartPole-v1 --total-timesteps {steps}' \
#     cleanrl '.venv/bin/python /tmp/cleanrl/ppo.py --env-id CartPole-v1 --total-timesteps {steps}' \
#     sb3     '/tmp/venv-sb3/bin/python /work/shared/peers/sb3_ppo.py --preset cartpole --total-timesteps {steps}'
#
# Each CMD is a shell command (run by bash -c, one at a time, in the current directory, so its relative paths and
# the runs/ folders that the programs write are there); every literal {steps} in it becomes STEPS. Each run's
# stdout and stderr go to OUT/NAME.roundR.log. Run nothing else meanwhile: on 2 cores it moves figures by 10-40%.
# Steps/s of a run: the LAST match in its log of the regex `SPS: *N` (CleanRL, sb3_ppo.py: cumulative steps/s,
# printed each iteration) or `N SPS\)` (this project's final `done: N steps in T s (X SPS)`), N being
# [0-9][0-9,.]* with its commas dropped; these time training only, after start-up. A run that prints neither gets
# STEPS / wall time (start-up included), marked `*`; a run that exits non-zero is shown as `fail` (see its log).
set -uo pipefail
rounds=3 steps=200000 out=/tmp/speed
while (($#)); do
  case $1 in
    --rounds) rounds=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) echo "speed.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
(($# >= 2 && $# % 2 == 0)) || { echo "speed.sh: give NAME 'CMD' pairs after -- (see --help)" >&2; exit 2; }
names=() cmds=()
while (($#)); do names+=("$1"); cmds+=("${2//\{steps\}/$steps}"); shift 2; done
mkdir -p "$out"
declare -A sps
for ((r = 1; r <= rounds; r++)); do
  for i in "${!names[@]}"; do
    log="$out/${names[i]}.round$r.log"
    t0=$(date +%s.%N); bash -c "${cmds[i]}" >"$log" 2>&1; rc=$?; t1=$(date +%s.%N)
    v=$(grep -oE 'SPS: *[0-9][0-9,.]*|[0-9][0-9,.]* SPS\)' "$log" | tail -n 1 | grep -oE '[0-9][0-9,.]*' | tr -d ,)
    if ((rc != 0)); then v=fail
    elif [[ -z $v ]]; then v="$(awk -v s="$steps" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", s / (b - a) }')*"
    else v=$(awk -v x="$v" 'BEGIN { printf "%.0f", x }'); fi
    sps[$r,$i]=$v
    echo "round $r/$rounds  ${names[i]}: $v steps/s  (exit $rc, $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s, $log)" >&2
  done
done
num() { [[ $1 =~ ^[0-9]+ ]] && echo "${BASH_REMATCH[0]}"; }  # "5123*" -> 5123, "fail" -> nothing
ratio() { local a b; a=$(num "$1") b=$(num "$2"); [[ -n $a && -n $b && $b != 0 ]] && awk -v a="$a" -v b="$b" 'BEGIN { printf "%.2f", a / b }' || echo -; }
median() { sort -n | awk '{ v[NR] = $1 } END { if (NR) printf "%.0f", NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; else printf "-" }'; }
{
  echo "steps/s at $steps steps, $rounds round(s), logs in $out"; echo
  head="| round |" rule="|---|"
  for n in "${names[@]}"; do head+=" $n |"; rule+="---:|"; done
  for n in "${names[@]:1}"; do head+=" ${names[0]}/$n |"; rule+="---:|"; done
  echo "$head"; echo "$rule"
  for ((r = 1; r <= rounds; r++)); do
    row="| $r |"
    for i in "${!names[@]}"; do row+=" ${sps[$r,$i]} |"; done
    for ((i = 1; i < ${#names[@]}; i++)); do row+=" $(ratio "${sps[$r,0]}" "${sps[$r,$i]}") |"; done
    echo "$row"
  done
  row="| median |" med=()
  for i in "${!names[@]}"; do med[i]=$(for ((r = 1; r <= rounds; r++)); do num "${sps[$r,$i]}"; done | median); row+=" ${med[i]} |"; done
  for ((i = 1; i < ${#names[@]}; i++)); do row+=" $(ratio "${med[0]}" "${med[i]}") |"; done
  echo "$row"
} | tee "$out/table.md"
