#!/usr/bin/env bash
# The first GPU run of fairtune, in one command (issue #20): bf16/compile correctness of every method
# family, packed-trial throughput (1-16 processes on the one GPU), a real `fairtune search` through
# Ray Tune with --gpus-per-trial 0.125 plus a `fairtune final`, and an extrapolation of the full
# CIFAR-10S protocol. Prints a summary table last; writes summary.md, summary.json and logs.tar.gz
# under $OUT when it is set (else build/gpu_check/). Exit 0 when every check passed.
#
# On the lent H200 (Python 3.12, torch 2.11, no Ray/Optuna, no registry), from the repository root,
# after `make bundle` here has put the wheels in .bundle/ (ignored by git, ~49 MB):
#   device tool `run`:  command   "bash benchmarks/gpu_check.sh"
#                       carry     [".bundle"]
#                       timeout_s 540          (the script itself takes about 6-8 minutes)
#   The wheels are installed with pip --no-index into /tmp/fairtune-site, which goes first on
#   PYTHONPATH with the repository root; nothing else is installed. The script keeps itself within
#   --budget-s 450 (BUDGET_S) by skipping throughput packings 2, 8, 4 (1 and 16 run first) if it must.
#   A lease is 15 minutes of device time, machine start (1-2 min) included: one full run fits; a
#   rerun must be shorter (e.g. --only ray, --packings 1,16, --compile none) and on the warm machine.
# On a CPU, without the bundle (what `make test` runs: 1-4 minutes on a shared 2-core machine):
#   bash benchmarks/gpu_check.sh --smoke        (uses ${PYTHON:-python3}, which must have the deps)
# Other flags go to benchmarks/gpu_check.py (--only, --packings, --compile, --out).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
python=${PYTHON:-python3}
smoke=0
for arg in "$@"; do [ "$arg" = --smoke ] && smoke=1; done
export PYTHONUNBUFFERED=1
if [ "$smoke" = 0 ]; then
  bundle=${BUNDLE:-$repo/.bundle}
  site=${SITE:-/tmp/fairtune-site}
  if ! ls "$bundle"/*.whl >/dev/null 2>&1; then
    echo "gpu_check: no wheels in $bundle; run 'make bundle' where a package registry is reachable and carry .bundle" >&2
    exit 2
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
  if ! "$python" -c "import ray, optuna" 2>/dev/null; then  # a warm machine keeps the last install
    start=$(date +%s)
    # --no-deps: the image already holds torch, numpy, pandas, pyarrow, aiohttp's parts ... (KINDS.md).
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$bundle"/*.whl
    echo "gpu_check: installed $(ls "$bundle"/*.whl | wc -l) wheels into $site in $(( $(date +%s) - start )) s"
  fi
  nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,utilization.gpu --format=csv 2>/dev/null || true
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
budget=()
[ "$smoke" = 0 ] && budget=(--budget-s "${BUDGET_S:-450}")  # a --budget-s given on the command line wins
exec "$python" "$repo/benchmarks/gpu_check.py" "${budget[@]}" "$@"
