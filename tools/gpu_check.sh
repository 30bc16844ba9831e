#!/usr/bin/env bash
# The GPU check: the whole GPU path in a few minutes, on a fresh CUDA machine, ending in one table.
#
#   bash tools/gpu_check.sh            # on a GPU machine: every check (~8 minutes warm; a cold H100 compiles
#                                      # TensorFlow's kernels from PTX first, minutes more, once)
#   bash tools/gpu_check.sh --cpu      # the same checks, small, on the CPU (what CI runs, so it cannot rot)
#
# On a GPU machine it first looks for NVIDIA GPUs (nvidia-smi -L, /proc/driver/nvidia/gpus/) and stops
# at once, exit 1, if there are none. If TensorFlow already sees a GPU it installs nothing; else it
# installs tensorflow[and-cuda] in requirements.txt's range, and stops if TensorFlow still sees none.
# Offline box: PIP_NO_INDEX=1 PIP_FIND_LINKS=/path/to/wheels (pip reads both) and MNIST_DIR=/path/to/mnist.
#
# Each check runs under its own timeout; one that fails or times out is marked so and the rest go on.
# The exit status is 0 only if every check passed. Logs: $GPU_CHECK_LOGS (default: a temporary
# directory), one file per check. $GPU_CHECK_ONLY picks checks by name; $GPU_CHECK_TIMEOUT_SCALE
# multiplies every timeout. The limits fit a cold machine: a GPU newer than TensorFlow's machine code
# compiles each kernel from PTX at its first use (minutes, once; ~/.nv/ComputeCache keeps them), and the
# first run of a model compiles its XLA program (kept in ~/.cache/tf2-gan-mnist/xla for the next).
# $GPU_CHECK_MIN_SCALING (default 1.0): mirroring the big model over every GPU must be at least this many
# times faster than one GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
[ "${1:-}" = "--cpu" ] && MODE=cpu
LOGS=${GPU_CHECK_LOGS:-$(mktemp -d)}
SCALE=${GPU_CHECK_TIMEOUT_SCALE:-1}  # A slow machine; or a test making a check expire.
OUT=$(mktemp -d)                      # Run directories, removed at the end.
trap 'rm -rf "$OUT"' EXIT
mkdir -p "$LOGS"
ROWS=()
FAILED=0

# check NAME SECONDS COMMAND...: run COMMAND under a timeout; keep its output; add a row to the table.
# $GPU_CHECK_ONLY (names, space-separated) runs only those checks.
check() {
  local name=$1 seconds=$2
  shift 2
  if [ -n "${GPU_CHECK_ONLY:-}" ] && [[ " $GPU_CHECK_ONLY " != *" $name "* ]]; then
    return
  fi
  local limit start status result
  limit=$(python -c "print(max(1, round($seconds * $SCALE)))")
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  status=$?
  case $status in
    0) result=passed ;;
    124|137) result="timed out (${limit} s)"; FAILED=1
             echo "[$name] timed out after ${limit} s: on a cold machine the first use of each kernel is compiled from PTX and the first run of a model compiles XLA; run it again (both are cached), or GPU_CHECK_TIMEOUT_SCALE=3" ;;
    *) result="failed (exit $status)"; FAILED=1 ;;
  esac
  ROWS+=("$(printf '%-30s %-22s %6s s  %s' "$name" "$result" "$(( $(date +%s) - start ))" "$(summary_of "$name")")")
  echo "[$name] $result"
}

# The line of a check's log worth showing in the table.
summary_of() {
  local log="$LOGS/$1.log"
  { grep -E "^(Speedup|Scaling|Done:|TensorFlow [0-9]|GPUs:|identical|differ)" "$log" || tail -n 1 "$log"; } \
    | tail -n 1 | cut -c1-110
}

# How many GPUs TensorFlow sees (0 if it does not load).
tensorflow_gpus() {
  python -c "from ganlab import tf; print(len(tf.config.list_physical_devices('GPU')))" 2>/dev/null || echo 0
}

if [ "$MODE" = gpu ]; then
  if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU ' && [ -z "$(ls -A /proc/driver/nvidia/gpus 2>/dev/null)" ]; then
    echo "gpu_check: no NVIDIA GPU visible (nvidia-smi -L lists none; /proc/driver/nvidia/gpus/ is empty): nothing to check (--cpu runs the CPU checks)"
    exit 1
  fi
  if [ "$(tensorflow_gpus)" -eq 0 ]; then  # Install only what is missing: TensorFlow's CUDA libraries.
    VERSION=$(grep -E '^tensorflow[>=<]' requirements.txt | cut -d' ' -f1 | sed 's/^tensorflow/tensorflow[and-cuda]/')
    check install 900 python -m pip install --quiet "$VERSION" -r requirements.txt
    if [ "$(tensorflow_gpus)" -eq 0 ]; then
      echo "gpu_check: TensorFlow sees no GPU after installing $VERSION (log: $LOGS/install.log; offline: PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR)"
      exit 1
    fi
  fi
  LIMIT=(); EPOCH_LIMIT=(); SAMPLES=(--num-samples 10000)
else
  LIMIT=(--limit 640); EPOCH_LIMIT=(--limit 640); SAMPLES=(--num-samples 200)
fi

check devices 600 env GPU_CHECK_MODE="$MODE" python - <<'EOF'
import os, sys
from ganlab import tf  # TensorFlow, loaded quietly
build = tf.sysconfig.get_build_info()
gpus = tf.config.list_physical_devices("GPU")
print(f"TensorFlow {tf.__version__}, CUDA {build.get('cuda_version', 'none')}, cuDNN {build.get('cudnn_version', 'none')}")
for gpu in gpus:
    details = tf.config.experimental.get_device_details(gpu)
    print(f"  {gpu.name}: {details.get('device_name')}, compute capability {details.get('compute_capability')}")
print(f"GPUs: {len(gpus)}" + ("" if gpus else " (the CPU only)"))
sys.exit(1 if os.environ["GPU_CHECK_MODE"] == "gpu" and not gpus else 0)  # A GPU check without a GPU fails.
EOF
GPUS=$(tensorflow_gpus)

# Speed: the chosen settings against a plain fp32 step (bench.py's table; see its last lines).
check bench_gan 900 python gan_mnist.py --benchmark "${LIMIT[@]}"
if [ "$MODE" = gpu ]; then
  for arch in 28 32 64; do
    check "bench_dcgan_$arch" 900 python dcgan_mnist.py --benchmark --arch "$arch"
  done
fi

# One epoch of each script with its evaluation (the classifier is trained once and cached).
check epoch_gan 900 python gan_mnist.py --epochs 1 "${EPOCH_LIMIT[@]}" "${SAMPLES[@]}" --out "$OUT/gan"
check epoch_dcgan 900 python dcgan_mnist.py --epochs 1 "${EPOCH_LIMIT[@]}" "${SAMPLES[@]}" --out "$OUT/dcgan"

# Resume: 1 epoch + 1 more must equal 2 straight, weight for weight, under --deterministic.
check resume_exact 1800 bash -c "
  set -e
  flags='--eval-every 0 --deterministic --seed 1 ${EPOCH_LIMIT[*]}'
  python dcgan_mnist.py --epochs 2 \$flags --out '$OUT/straight' > /dev/null
  python dcgan_mnist.py --epochs 1 \$flags --out '$OUT/resumed' > /dev/null
  python dcgan_mnist.py --epochs 2 --resume --out '$OUT/resumed' > /dev/null
  python - '$OUT/straight' '$OUT/resumed' <<'PY'
import sys
from ganlab import keras  # loaded quietly
import numpy as np
a, b = (keras.saving.load_model(f'{d}/generator.keras', compile=False).get_weights() for d in sys.argv[1:])
worst = max(float(np.abs(x - y).max()) for x, y in zip(a, b))
print('identical' if worst == 0 else f'differ by up to {worst}')
sys.exit(worst != 0)
PY"

# The mixed-precision and XLA paths, a few steps each.
check fp16 900 python dcgan_mnist.py --epochs 1 --precision fp16 --eval-every 0 --limit 640 --out "$OUT/fp16"
check xla 900 python dcgan_mnist.py --epochs 1 --xla --eval-every 0 --limit 640 --out "$OUT/xla"

# Several devices: every GPU mirrored (or three logical CPU devices), and its scaling against one. The
# default recipes run on any device count: batch 64 over 3 is 22, 21, 21; 100 over 8 is 13 and 12.
if [ "$GPUS" -ge 2 ] || [ "$MODE" = cpu ]; then
  DEVICES=(--distribute mirrored)
  [ "$MODE" = cpu ] && DEVICES+=(--cpu-devices 3)
  check mirrored_epoch 900 python dcgan_mnist.py --epochs 1 --eval-every 0 --limit 1280 "${DEVICES[@]}" \
    --out "$OUT/mirrored"
  check mirrored_bench 900 python gan_mnist.py --benchmark "${LIMIT[@]}" "${DEVICES[@]}"
fi

# Mirroring pays where --distribute auto says it does: the big model (--arch 64; on the CPU, whatever
# GPU_CHECK_ONLY names, the small GAN) over every GPU against one, from the benchmark's scaling line.
if [ "$GPUS" -ge 2 ] || [[ " ${GPU_CHECK_ONLY:-} " == *" mirrored_pays "* ]]; then
  MODEL=(dcgan_mnist.py --arch 64)
  [ "$MODE" = cpu ] && MODEL=(gan_mnist.py "${LIMIT[@]}" --cpu-devices 3)
  check mirrored_pays 1800 bash -c '
    python "$@" --benchmark --distribute mirrored | tee /dev/stderr | python -c "
import re, sys
scaling = [float(m.group(1)) for m in re.finditer(r\"against one device: ([0-9.]+)x\", sys.stdin.read())]
least = float(sys.argv[1])
if not scaling:
    sys.exit(\"no scaling line in the benchmark\")
print(f\"Scaling {scaling[-1]:.2f}x over one device (at least {least:g}x wanted)\")
sys.exit(0 if scaling[-1] >= least else f\"mirroring is slower than it should be: {scaling[-1]:.2f}x of one device\")
" "${GPU_CHECK_MIN_SCALING:-1.0}"' _ "${MODEL[@]}"
fi

echo
echo "GPU check ($MODE) on $(python -c "from ganlab import tf; print(', '.join(tf.config.experimental.get_device_details(g).get('device_name', g.name) for g in tf.config.list_physical_devices('GPU')) or 'the CPU')" 2>/dev/null); logs in $LOGS"
printf '%-30s %-22s %8s  %s\n' check result time "what it printed last"
printf '%s\n' "${ROWS[@]}"
exit $FAILED
