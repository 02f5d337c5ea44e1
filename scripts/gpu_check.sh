#!/usr/bin/env bash
# Every GPU check of the speed issue in one call, for a lent GPU machine that has
# torch/torchvision/transformers but no detectron2. Expects .d2whl/ (carried, git-ignored) to hold
# the sal-detectron2 wheel, the wheels of detectron2's small dependencies and a bert_tokenizer/
# folder (vocab.txt, tokenizer.json): `bash scripts/prepare_gpu_wheels.sh` fills it (seconds). Writes
# results under $OUT (JSON lines + text logs) and prints a short summary last. A failing step is
# reported and the next one still runs. Device call: run(command="bash scripts/gpu_check.sh",
# carry=[".d2whl"], timeout_s=600); OUT is the device's $OUT there.
# Smoke run on a CPU machine before booking a GPU (small model and images, same steps; 7-12
# minutes on 2 cores; pycocotools' 3.12 wheel is refused on another Python, the .venv has it):
#   PATH=$PWD/.venv/bin:$PATH DEVICE=cpu CONFIG=configs/quickstart/demo.yaml SIZE="--height 256 --width 320" \
#     EXTRA_OPTS="MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN 256" OUT=/tmp/gpu_check_smoke bash scripts/gpu_check.sh
set -uo pipefail
OUT=${OUT:-output/gpu_check}
DEVICE=${DEVICE:-cuda}
CONFIG=${CONFIG:-configs/glipv2_T.yaml}
SIZE=${SIZE:-"--height 800 --width 1333"}
EXTRA_OPTS=${EXTRA_OPTS:-}
mkdir -p "$OUT"
python3 -m zipfile -e .d2whl/sal_detectron2-*.whl /tmp/d2
rm -f /tmp/d2/detectron2/_C*.so
python3 -m pip install -q --no-index --no-deps --target /tmp/site $(ls .d2whl/*.whl | grep -v sal_detectron2)
# detectron2 imports cv2 at module level but only calls it in transforms this project never uses.
python3 -c "import cv2" 2>/dev/null || { echo "note: no cv2 here, using an empty stand-in"; touch /tmp/site/cv2.py; }
export PYTHONPATH=/tmp/site:/tmp/d2:$PWD
TOKENIZER="MODEL.LANGUAGE_BACKBONE.TOKENIZER .d2whl/bert_tokenizer $EXTRA_OPTS"
BENCH="python3 tools/benchmark.py --config-file $CONFIG --device $DEVICE $SIZE"
FULL="$TOKENIZER MODEL.DYHEAD.PRIOR_PROB 0.5"  # random weights keep a full 100 detections
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no nvidia-smi (device $DEVICE)"

step() {  # step NAME COMMAND...: run, keep the log, never stop the script
  local name=$1; shift
  echo "== $name"
  "$@" > "$OUT/$name.txt" 2>&1 || echo "!! $name failed (exit $?), see $OUT/$name.txt"
  grep -v -i warn "$OUT/$name.txt" | grep -E "^\||PASS|FAIL|error" | tail -40
}

# fp32 against the CPU (TF32 off) and bf16 / fp16 detections against fp32 on 8 fixed images.
step check_cuda python3 tools/check_cuda.py --config-file $CONFIG --device $DEVICE --size 480 640 $TOKENIZER
# The same agreement with DyConv (deformable convs included) following autocast: the accuracy side
# of the reduced-precision lever whose speed infer_b1_dyconv measures.
step check_cuda_dyconv python3 tools/check_cuda.py --config-file $CONFIG --device $DEVICE --size 480 640 \
  $TOKENIZER MODEL.DYHEAD.DYCONV_PRECISION autocast
# Batch 1: every precision, the peer in the same process, stage and op profiles.
step infer_b1 $BENCH --batch-size 1 --precision fp32,bf16,fp16 --iters 20 --warmup 5 --profile-stages \
  --profile-ops --peer grounding-dino --json-lines "$OUT/infer_b1.jsonl" $FULL
# The deformable conv as a gather + matmul (the CPU default) on CUDA, to decide its CUDA default.
step infer_b1_gather $BENCH --batch-size 1 --precision fp32,bf16 --iters 20 --warmup 5 \
  --json-lines "$OUT/infer_b1_gather.jsonl" $FULL MODEL.DYHEAD.DEFORM_CONV_IMPL gather
# DyConv in the autocast dtype (its deformable convs by the gather kernel), at batch 1 and 8.
step infer_b1_dyconv $BENCH --batch-size 1 --precision bf16,fp16 --iters 20 --warmup 5 --profile-stages \
  --json-lines "$OUT/infer_b1_dyconv.jsonl" $FULL MODEL.DYHEAD.DYCONV_PRECISION autocast
step infer_b8_dyconv $BENCH --batch-size 8 --precision bf16 --iters 10 --warmup 3 \
  --json-lines "$OUT/infer_b8_dyconv.jsonl" $FULL MODEL.DYHEAD.DYCONV_PRECISION autocast
# Batched throughput.
step infer_b8 $BENCH --batch-size 8 --precision bf16,fp32 --iters 10 --warmup 3 --peer grounding-dino \
  --json-lines "$OUT/infer_b8.jsonl" $FULL
# LVIS-style vocabulary: 1,203 names in chunks of 40, backbone once, chunks batched.
step infer_lvis $BENCH --vocabulary lvis --chunk-size 40 --batch-size 1 --precision bf16,fp32 --iters 5 \
  --warmup 2 --json-lines "$OUT/infer_lvis.jsonl" $FULL
# Training: batch 4 with the real loss, bf16 and fp32; no checkpointing, the fusion tower's, all three parts'.
step train_b4 $BENCH --train --batch-size 4 --precision bf16,fp32 --checkpointing none,fusion,all --iters 10 \
  --warmup 3 --json-lines "$OUT/train_b4.jsonl" $TOKENIZER
step train_b4_dyconv $BENCH --train --batch-size 4 --precision bf16 --checkpointing none --iters 10 --warmup 3 \
  --json-lines "$OUT/train_b4_dyconv.jsonl" $TOKENIZER MODEL.DYHEAD.DYCONV_PRECISION autocast
# Last, as compiling may take minutes: tower + head through torch.compile with CUDA graphs
# (TEST.COMPILE_FUSION), DyConv in bf16; the warm-up iterations absorb the compilation.
step infer_b1_compiled $BENCH --batch-size 1 --precision bf16 --iters 20 --warmup 5 \
  --json-lines "$OUT/infer_b1_compiled.jsonl" $FULL TEST.COMPILE_FUSION reduce-overhead \
  MODEL.DYHEAD.DYCONV_PRECISION autocast

echo "== summary (images/s; peak MiB; training: MiB of activations kept for backward)"
python3 - "$OUT" <<'PY'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.jsonl")):
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("table") in ("speed", "training"):
            what = row.get("model", "glipv2") + (f" ckpt={row['checkpointing']}" if "checkpointing" in row else "")
            print(f"{path.stem:16s} {what:28s} {row.get('precision', ''):5s} b{row.get('batch_size')} "
                  f"{row.get('images_per_s', 0):7.2f} img/s  {row.get('peak_mem_mib', 0):8.0f} MiB"
                  + (f"  kept {row['saved_activations_mib']:7.0f} MiB" if "saved_activations_mib" in row else ""))
PY
