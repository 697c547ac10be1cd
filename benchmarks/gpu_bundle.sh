#!/usr/bin/env bash
# Prepare the carry folder for one run of benchmarks/gpu.py on a GPU machine that has Python 3.12 and torch (CUDA)
# but no package registry and no ComfyUI, and that receives at most 64 MiB of this repository's tree:
#
#   .gpu-carry/ComfyUI/   ComfyUI's source from COMFYUI_PATH (no .git, tests, API nodes, or tokenizers SD models
#                         do not use)
#   .gpu-carry/wheels/    wheels of what that machine lacks (WHEELS below), for CPython 3.12 on x86-64 Linux
#   .gpu-carry/run.sh     the command to run there: installs the wheels into /tmp/site, runs the check, writes
#                         $OUT/gpu.json and $OUT/gpu.log (OUT defaults to the current folder)
#
# Usage: bash benchmarks/gpu_bundle.sh [--dry-run] [--out DIR] [--limit-mib N]
#   --dry-run     copy ComfyUI and write run.sh, download no wheel (their size is then not counted)
#   --out DIR     the carry folder (default .gpu-carry in the repository; .gitignore ignores it)
#   --limit-mib N fail when the repository's files plus the carry folder exceed N MiB (default 64)
# Then, on the device: carry [".gpu-carry"], command "bash .gpu-carry/run.sh" (README, "GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT_DIR="$ROOT/.gpu-carry"
LIMIT_MIB=64
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT_DIR=$(realpath -m "$2"); shift ;;
    --limit-mib) LIMIT_MIB=$2; shift ;;
    *) echo "unknown argument: $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done

COMFY="${COMFYUI_PATH:-$HOME/comfy/ComfyUI}"
if [ ! -f "$COMFY/main.py" ] || [ ! -d "$COMFY/comfy" ]; then
  echo "ComfyUI not found at '$COMFY': set COMFYUI_PATH to its folder." >&2
  exit 2
fi

# What the GPU machine lacks for ComfyUI's nodes, this pack and its core tests (its image has torch, torchvision,
# numpy, scipy, einops, safetensors, transformers, tokenizers, pillow, psutil, pyyaml, aiohttp, pytest, hypothesis):
# av (comfy_api imports it), torchsde + trampoline (ComfyUI's samplers), kornia + kornia_rs and pydicom (this pack),
# spandrel (ComfyUI's upscale nodes, imported with the others). --no-deps: every one is named here.
WHEELS=(av==18.1.0 torchsde==0.2.6 trampoline==0.1.2 kornia==0.9.0 kornia_rs==0.2.0 pydicom==3.0.2 spandrel==0.4.2)

rm -rf "$OUT_DIR"
mkdir -p "$OUT_DIR/wheels"
# ComfyUI: what in-process SD1.x/SDXL sampling imports. Tokenizers of other model families are dropped (SD1.x and
# SDXL tokenize with comfy/sd1_tokenizer); so are its tests, API nodes (never loaded: init_api_nodes=False) and git.
# (Patterns anchored at "./": an unanchored 'input/*' would also drop comfy_api/input.)
tar -C "$COMFY" -cf - \
  --exclude=./.git --exclude=./.github --exclude=./.ci --exclude=./tests --exclude=./tests-unit \
  --exclude=./comfy_api_nodes --exclude=./script_examples --exclude=__pycache__ --exclude='*.pyc' \
  --exclude='./comfy/text_encoders/*_tokenizer' --exclude='./models/*/*.safetensors' --exclude='./custom_nodes/*' \
  --exclude='./input/*' --exclude='./output/*' --exclude='./temp/*' --exclude='./user/*' . \
  | (mkdir -p "$OUT_DIR/ComfyUI" && tar -C "$OUT_DIR/ComfyUI" -xf -)

if [ "$DRY" = 0 ]; then
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$OUT_DIR/wheels" "${WHEELS[@]}"
fi

cat > "$OUT_DIR/run.sh" <<'EOF'
#!/usr/bin/env bash
# On the GPU machine, from the repository's root: install the carried wheels into /tmp/site and run the check.
set -uo pipefail
CARRY=$(cd "$(dirname "$0")" && pwd)
OUT="${OUT:-$(pwd)}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$CARRY"/wheels/*.whl || exit 3
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} COMFYUI_PATH="$CARRY/ComfyUI" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/gpu.py --device cuda --json "$OUT/gpu.json" "$@" 2>&1 | tee "$OUT/gpu.log"
EOF
chmod +x "$OUT_DIR/run.sh"

# What travels: the repository's tracked and untracked-but-not-ignored files, plus the carry folder.
repo_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null \
  | awk '{s += $1} END {print s + 0}')
carry_bytes=$(du -sb "$OUT_DIR" | cut -f1)
wheel_bytes=$(du -sb "$OUT_DIR/wheels" | cut -f1)
total=$((repo_bytes + carry_bytes))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
echo "carry folder: $OUT_DIR"
echo "sizes (MiB): repository $(mib "$repo_bytes"), ComfyUI $(mib $((carry_bytes - wheel_bytes))), wheels" \
  "$(mib "$wheel_bytes")$([ "$DRY" = 1 ] && echo ' (dry run: none downloaded)'), total $(mib "$total") of $LIMIT_MIB"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "over the limit: $(mib "$total") MiB travel, the device takes $LIMIT_MIB MiB" >&2
  exit 1
fi
echo "device run: carry [\"$(basename "$OUT_DIR")\"], command \"bash $(basename "$OUT_DIR")/run.sh\""
