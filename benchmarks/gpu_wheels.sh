#!/usr/bin/env bash
# The wheels an air-gapped GPU node lacks, downloaded on a machine that has a package index:
#
#   bash benchmarks/gpu_wheels.sh [DIR]        # default DIR: wheelhouse/ (git-ignored)
#
# The node (issue #15): CPython 3.12 on manylinux x86-64 with torch 2.11 (CUDA 13), torchvision
# 0.26, timm, accelerate 1.15, transformers, safetensors, numpy, pillow, tqdm, pyyaml,
# tensorboard, matplotlib, pandas and pyarrow preinstalled (and what they depend on), but no
# deepspeed, datasets, pydantic or ffcv, no network, and at most ~60 MiB to carry in.
#
# What it lacks is read from the packages' own metadata, not listed by hand:
#   1. wheels are built here for fap itself and for the sdist-only packages (deepspeed: with
#      DS_BUILD_OPS=0 a pure-Python py3-none-any wheel, so the node builds nothing);
#   2. pip resolves the present set and fap[deepspeed,hf] together for the node's interpreter
#      and platform (pip install --dry-run --ignore-installed --report, binary wheels only);
#   3. benchmarks/gpu_wheels.py walks the Requires-Dist graph of that report: what fap[deepspeed,hf]
#      reaches minus what the present set reaches without entering deepspeed/datasets/pydantic/ffcv;
#   4. those exact versions are downloaded (--no-deps, binary only) beside the built wheels.
# It prints every file with its size and the total, writes DIR/MANIFEST.txt, and fails when
# the total reaches LIMIT_MIB (60). Measured on 2026-12-06 for the default node: 16 wheels,
# 40.7 MiB, scipy 35 MB of it (benchmarks/results/README.md lists them).
#
# Install on the node (benchmarks/gpu_check.sh does it when `import fap, deepspeed` fails):
#   python3 -m pip install --no-index --no-deps --target DIR/site DIR/*.whl
#
# Settings (environment):
#   PY           python whose pip (>= 23) resolves and downloads (default: python3)
#   PYVER        the node's Python (default 3.12); CI's toy install test uses its own 3.11
#   PRESENT      the node's preinstalled requirements (default below: the issue's versions for
#                torch, torchvision and accelerate, this project's machine's for the rest)
#   ABSENT       packages the node lacks even where a present one requires them
#   WANT         what to bring (default: fap[deepspeed,hf], i.e. fap, deepspeed and datasets)
#   LIMIT_MIB    fail at or above this total (default 60)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
DIR="$(mkdir -p "${1:-$REPO/wheelhouse}" && cd "${1:-$REPO/wheelhouse}" && pwd)"
PY=${PY:-python3}
PYVER=${PYVER:-3.12}
PRESENT=${PRESENT:-"torch==2.11.0 torchvision==0.26.0 accelerate==1.15.0 timm==1.0.31 transformers==5.24.0
 safetensors==0.8.0 numpy==2.4.6 pillow==13.0.0 tqdm==4.70.1 pyyaml==6.0.4 tensorboard==2.21.0
 matplotlib==3.11.2 pandas==3.1.1 pyarrow==26.0.1"}
ABSENT=${ABSENT:-"deepspeed datasets pydantic ffcv"}
WANT=${WANT:-"fap[deepspeed,hf]"}
SDIST_ONLY=${SDIST_ONLY:-"deepspeed==0.19.8"}   # PyPI has no wheel of these: built here
LIMIT_MIB=${LIMIT_MIB:-60}
ABI="cp${PYVER/./}"
TARGET=(--python-version "$PYVER" --implementation cp --abi "$ABI" --only-binary=:all:)
for v in $(seq 28 -1 5); do TARGET+=(--platform "manylinux_2_${v}_x86_64"); done  # torch cu13 is manylinux_2_28
TARGET+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
quiet() { grep -v -e '^WARNING: Location' -e '^$' || true; }   # a local mirror's file:// index noise

STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
rm -f "$DIR"/*.whl "$DIR"/*.tar.gz "$DIR/MANIFEST.txt"
echo "== 1. wheels built here: fap, and $SDIST_ONLY"
"$PY" -m pip wheel -q --no-deps -w "$STAGE/local" "$REPO" 2>&1 | quiet
# shellcheck disable=SC2086
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w "$STAGE/local" $SDIST_ONLY 2>&1 | quiet
for w in "$STAGE"/local/*.whl; do
    case "$w" in *-py3-none-any.whl) ;; *) echo "gpu_wheels.sh: $w is not a pure-Python wheel; the node could not use it" >&2; exit 1;; esac
done

echo "== 2. resolve the present set and $WANT for CPython $PYVER manylinux x86-64"
# shellcheck disable=SC2086
"$PY" -m pip install -q --dry-run --ignore-installed --report "$STAGE/report.json" --target "$STAGE/none" \
    "${TARGET[@]}" --find-links "$STAGE/local" $PRESENT "$WANT" 2>&1 | quiet

echo "== 3. what the node lacks (benchmarks/gpu_wheels.py, from the packages' Requires-Dist)"
"$PY" "$REPO/benchmarks/gpu_wheels.py" "$STAGE/report.json" --present "$PRESENT" --absent "$ABSENT" \
    --want "$WANT" --python-version "$PYVER" > "$STAGE/missing.txt"
sed 's/^/   /' "$STAGE/missing.txt"
norm() { echo "$1" | tr 'A-Z.-' 'a-z__'; }        # a wheel file's spelling of a project name
: > "$STAGE/download.txt"
while read -r req; do
    built=$(find "$STAGE/local" -iname "$(norm "${req%%==*}")-${req##*==}-*.whl" | head -1)
    if [ -n "$built" ]; then cp "$built" "$DIR"/; else echo "$req" >> "$STAGE/download.txt"; fi
done < "$STAGE/missing.txt"

echo "== 4. download (no dependencies, binary only) into $DIR"
if [ -s "$STAGE/download.txt" ]; then
    "$PY" -m pip download -q --no-deps -d "$DIR" "${TARGET[@]}" -r "$STAGE/download.txt" 2>&1 | quiet
fi
got=$(find "$DIR" -maxdepth 1 -name '*.whl' | wc -l)
want=$(wc -l < "$STAGE/missing.txt")
[ "$got" -eq "$want" ] || { echo "gpu_wheels.sh: $got wheels in $DIR for $want packages" >&2; exit 1; }

{
    echo "# benchmarks/gpu_wheels.sh: CPython $PYVER manylinux x86-64, $(date -u +%Y-%m-%d)"
    echo "# present: $(echo $PRESENT)"
    echo "# absent: $ABSENT; want: $WANT"
    echo "# install: python3 -m pip install --no-index --no-deps --target DIR/site DIR/*.whl"
    (cd "$DIR" && for f in *.whl; do printf '%10d  %s\n' "$(stat -c %s "$f")" "$f"; done)
} > "$DIR/MANIFEST.txt"
grep -v '^#' "$DIR/MANIFEST.txt"
total=$(cd "$DIR" && cat -- *.whl | wc -c)
echo "total: $got wheels, $total bytes = $(awk -v b="$total" 'BEGIN{printf "%.1f", b/1048576}') MiB (limit $LIMIT_MIB MiB)"
echo "total_bytes $total" >> "$DIR/MANIFEST.txt"
if [ "$total" -ge $((LIMIT_MIB * 1048576)) ]; then
    echo "gpu_wheels.sh: $DIR holds $total bytes, at or above LIMIT_MIB=$LIMIT_MIB MiB" >&2
    exit 1
fi
