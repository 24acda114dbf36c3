#!/usr/bin/env bash
# Build, on a machine with package-registry access, the wheels that Ray Tune + Optuna need on the lent
# H200 machine (Python 3.12, torch 2.11 already there, no registry; its package list is in the device
# tool's KINDS.md). Ray's own wheel (79 MB) is over the 64 MiB that can travel with the working tree,
# so it is repacked without what a Tune search never loads (the Java jar, the dashboard's web client,
# rllib, serve, llm): about 42 MB; with Optuna and 14 small wheels, 16 wheels, about 49 MB (48.3 MiB).
# From ../shared/gpu/make-bundle.sh, changed: every version pinned (the bundle that was checked is the
# one rebuilt), the folder emptied first (two versions of one package stop pip's whole install), and
# the bundle plus the tracked working tree measured against the device tool's 64 MiB.
#   usage: benchmarks/gpu/make-bundle.sh [DIR]      (default .bundle, which .gitignore ignores; `make bundle`)
#   there: benchmarks/gpu_check.sh installs it:  python3 -m pip install -q --no-index --no-deps --no-compile
#          --target /tmp/fairtune-site .bundle/*.whl && export PYTHONPATH=/tmp/fairtune-site:$PWD
set -euo pipefail
dir=${1:-.bundle}
python=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
mkdir -p "$dir"
rm -f "$dir"/*.whl
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
"$python" -m pip download -q --no-deps "${plat[@]}" -d "$tmp" ray==2.60.0
"$python" "$here/strip_ray.py" "$tmp"/ray-2.60.0-*.whl "$dir/$(basename "$tmp"/ray-2.60.0-*.whl)"
# What ray[tune] and optuna need that the H200 image lacks (Requires-Dist of each, less the image's list).
"$python" -m pip download -q --no-deps "${plat[@]}" -d "$dir" optuna==5.0.0 alembic==1.20.1 sqlalchemy==2.1.9 \
  mako==1.4.3 colorlog==6.12.0 tensorboardx==2.6.5 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 \
  referencing==0.37.0 rpds-py==2026.9.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 typing-extensions==4.16.0
ls "$dir"
# What the device tool carries: tracked + untracked-not-ignored files, plus the carried bundle (64 MiB in all).
bundle=$(du -sb "$dir" | cut -f1)
tree=$(cd "$repo" && { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
total=$((bundle + tree)); limit=$((64 * 1024 * 1024))
awk -v b="$bundle" -v t="$tree" 'BEGIN { m = 1048576; printf "bundle %.1f MiB + working tree %.1f MiB = %.1f MiB of the 64 MiB that can travel\n", b / m, t / m, (b + t) / m }'
[ "$total" -lt "$limit" ] || { echo "make-bundle: over the device tool's 64 MiB" >&2; exit 1; }
