#!/usr/bin/env bash
# One short GPU run of the three performance benchmarks (issue "performance", item 4).
#
#   bash benchmarks/gpu.sh --fetch     # HERE, where pip works: wheels the GPU machine lacks -> .whl/
#   bash benchmarks/gpu.sh             # THERE (device tool: carry [".whl"]): install them, run, write $OUT
#
# The GPU machine has torch, transformers, safetensors, tokenizers, typer, rich, numpy, matplotlib and
# tensorboard but no pydantic; its python3 is 3.12 (hence cp312 wheels); moelab runs from src/ without
# being installed. Budget: each benchmark has its own time limit (200 + 150 + 90 s, so the whole run
# stays under the device tool's 600 s per command); its table and RESULT line go to $OUT/<name>.txt,
# so a timeout still returns what finished.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--fetch" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "pydantic==2.14.4" "pydantic_core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5"
    exit $?
fi
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
if ! python3 -c "import pydantic" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        || { echo "pydantic missing and no wheels in .whl/: run 'bash benchmarks/gpu.sh --fetch' first"; exit 2; }
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
DEVICE="${DEVICE:-cuda}"   # DEVICE=cpu: a dry run of this script on a machine without a GPU
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import torch, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print("torch", torch.__version__, "| transformers", transformers.__version__, "|", gpu)
import torch.nn.functional as F
print("F.grouped_mm:", hasattr(F, "grouped_mm"))   # moelab's grouped expert kernels need it
PY
run() {  # name, seconds, args...
    local name=$1 limit=$2; shift 2
    echo "== $name $*"
    timeout "$limit" python3 "benchmarks/$name.py" --device "$DEVICE" "$@" 2>&1 | tee "$OUT/$name.txt"
}
run moe_layer 200 --reps 5
run train_step 150 --reps 5 --warmup 3
run decode 90 --reps 3
