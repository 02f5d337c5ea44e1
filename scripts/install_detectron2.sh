#!/usr/bin/env bash
# Make detectron2 importable in the given Python environment.
# A detectron2 that already imports (e.g. one the user compiled with its CUDA ops) is kept.
# Otherwise its pure-Python sources are installed from the `sal-detectron2` wheel on PyPI
# (official detectron2 main, spring 2024), whose prebuilt extension targets another
# CPython and is removed; every op this project needs goes through torchvision instead.
set -euo pipefail
PY=${1:?usage: install_detectron2.sh PYTHON}
if "$PY" -c "import detectron2" 2>/dev/null; then
  echo "detectron2 already importable: $("$PY" -c 'import detectron2, os; print(os.path.dirname(detectron2.__file__))')"
  exit 0
fi
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$PY" -m pip install --quiet --no-deps --only-binary=:all: --python-version 3.10 --implementation cp \
  --platform linux_x86_64 --upgrade --target "$SITE/.glipv2_d2_detectron2" sal-detectron2==0.7.2
rm -f "$SITE"/.glipv2_d2_detectron2/detectron2/_C*.so
echo "$SITE/.glipv2_d2_detectron2" > "$SITE/glipv2_d2_detectron2.pth"
"$PY" -c "import detectron2; print('detectron2 sources installed at', detectron2.__file__)"
