#!/usr/bin/env bash
# Every GPU check in one call, for a lent GPU machine that has torch/torchvision/transformers but no
# detectron2. Expects .d2whl/ (carried, git-ignored) to hold the
# sal-detectron2 wheel, the wheels of detectron2's small dependencies and a bert_tokenizer/ folder
# (vocab.txt, tokenizer.json). Writes results under $OUT.
set -euo pipefail
OUT=${OUT:-output/gpu_check}
mkdir -p "$OUT"
python3 -m zipfile -e .d2whl/sal_detectron2-*.whl /tmp/d2
rm -f /tmp/d2/detectron2/_C*.so
python3 -m pip install -q --no-index --no-deps --target /tmp/site $(ls .d2whl/*.whl | grep -v sal_detectron2)
# detectron2 imports cv2 at module level but only calls it in transforms this project never uses.
python3 -c "import cv2" 2>/dev/null || { echo "note: no cv2 here, using an empty stand-in"; touch /tmp/site/cv2.py; }
export PYTHONPATH=/tmp/site:/tmp/d2:$PWD
TOKENIZER="MODEL.LANGUAGE_BACKBONE.TOKENIZER .d2whl/bert_tokenizer"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 tools/check_cuda.py --config-file configs/glipv2_T.yaml --size 480 640 $TOKENIZER 2>&1 \
  | grep -v -i warn | tee "$OUT/check_cuda.txt" || echo "check_cuda reported a mismatch"
for BATCH in 1 2; do
  python3 tools/benchmark.py --config-file configs/glipv2_T.yaml --device cuda --batch-size $BATCH \
    --precision fp32,bf16,fp16 --iters 20 --warmup 5 --profile-stages --json "$OUT/glipv2_T_b$BATCH.json" \
    $TOKENIZER MODEL.DYHEAD.PRIOR_PROB 0.5 2>&1 | grep -v -i warn | tee "$OUT/glipv2_T_b$BATCH.txt"
done
