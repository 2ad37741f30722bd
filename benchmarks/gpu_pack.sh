#!/usr/bin/env bash
# Pack what benchmarks/gpu_check.py needs on a lent GPU machine whose image has PyTorch, Triton, pytest and
# hypothesis but not metalm's other dependencies, and that reaches no package registry (docs/gpu-check.md):
#
#   .whl/                          Python 3.12 x86-64 wheels: DeepSpeed (built here from its source archive,
#                                  without compiled ops), the packages it and metalm import that such an image
#                                  lacks (versions from constraints.txt) and Liger-Kernel (a baseline of section 2)
#   data/wiki-vital-2048/shards/   the built-in corpus prepared as configs/11m.yaml says (seq 2048); sections 3
#                                  and 4 train on it
#
# Both folders are git-ignored. The script then checks that they and the working tree fit the device tool's
# 64 MiB and prints the call to make. Run it from any directory; PYTHON picks the interpreter that has metalm
# installed (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
LIMIT_MIB=64
SHARDS=data/wiki-vital-2048/shards
LIGER=liger-kernel==0.8.5
# What DeepSpeed and metalm import beyond such an image's packages, as pinned in constraints.txt.
MISSING=(annotated-types antlr4-python3-runtime braceexpand hjson omegaconf pydantic pydantic_core
         typing_extensions typing-inspection webdataset)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

normalise() {  # pip's name comparison: case, '_' and '.' do not matter
    local s=${1,,}
    s=${s//_/-}
    echo "${s//./-}"
}

pin() {  # NAME -> NAME==VERSION as constraints.txt pins it
    local want line
    want=$(normalise "$1")
    while IFS= read -r line; do
        if [[ $line == *==* && $(normalise "${line%%==*}") == "$want" ]]; then
            echo "$line"
            return
        fi
    done <constraints.txt
    echo "gpu_pack: $1 is not pinned in constraints.txt" >&2
    exit 1
}

echo "gpu_pack: wheels into .whl/"
rm -rf .whl
mkdir -p .whl
specs=()
for name in "${MISSING[@]}"; do
    specs+=("$(pin "$name")")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "${specs[@]}" "$LIGER"

# DeepSpeed publishes only a source archive: build a pure-Python wheel here (DS_BUILD_OPS=0: no compiled ops,
# metalm uses none; DS_ACCELERATOR=cuda: recorded as built for CUDA).
deepspeed=$(pin deepspeed)
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
"$PYTHON" -m pip download -q --no-deps --no-binary :all: -d "$build" "$deepspeed"
DS_ACCELERATOR=cuda DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir \
    -w .whl "$build"/deepspeed-*.tar.gz

if [[ -f $SHARDS/manifest.json ]]; then
    echo "gpu_pack: $SHARDS already prepared"
else
    echo "gpu_pack: preparing $SHARDS from the built-in corpus"
    "$PYTHON" -m metalm.data.prepare --config configs/11m.yaml --no-progress
fi

tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -n 1 | cut -f 1)
carried=$(du -cb .whl "$SHARDS" | tail -n 1 | cut -f 1)
total=$((tree + carried))
echo "gpu_pack: working tree $((tree >> 20)) MiB + .whl and shards $((carried >> 20)) MiB = $((total >> 20)) MiB" \
     "(limit $LIMIT_MIB MiB)"
if ((total > LIMIT_MIB << 20)); then
    echo "gpu_pack: over the device tool's $LIMIT_MIB MiB: carry less (untracked files travel too)" >&2
    exit 1
fi

cat <<EOF

Device call: run with carry [".whl", "$SHARDS"] and timeout_s 570, command:

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; set -o pipefail; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out \$OUT/gpu-check 2>&1 | tee \$OUT/gpu-check.log
EOF
