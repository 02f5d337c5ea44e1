# Two entry points for a fresh machine (see README.md):
#   make quickstart - install into .venv, generate the synthetic data, train the small model on the
#                     CPU, evaluate it with COCOEvaluator and draw predictions on val images; then
#                     train its mask head with the detector frozen (configs/quickstart/mask.yaml),
#                     evaluate masks (COCO segm AP, PhraseCut metrics) and draw them
#   make quickstart-vl - the understanding stages on the quick-start detector (make quickstart first, or
#                     it runs it): grounded VQA on the synthetic questions (configs/quickstart/vqa.yaml,
#                     6-10 minutes + 1-2 of evaluation on 2 CPU cores), accuracy next to the majority
#                     answer per question type, and one answered val image drawn; then grounded
#                     captioning (configs/quickstart/caption.yaml, 12 minutes beside another job),
#                     CIDEr next to the most frequent caption, and one captioned val image drawn
#   make demo   - install into .venv, then draw the quick-start model's boxes (and masks, once its
#                 segmentation stage has run) on synthetic val images (once make quickstart has
#                 trained it; untrained weights on a photo before)
#   make web-demo - install into .venv with the web extras (requirements-web.txt), then serve the
#                   web demo on http://127.0.0.1:7860 (the quick-start model once trained)
#   make test   - install into .venv with the web extras and Debian's chromium + chromium-driver
#                 (for the browser test), then run the test suite
# Every target is idempotent: a second run reuses .venv and only installs what is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WEB_STAMP := $(VENV)/.installed-web
BROWSER := /usr/bin/chromium /usr/bin/chromedriver

.PHONY: install quickstart quickstart-vl demo web-demo browser test lint benchmark

$(STAMP): requirements.txt setup.py scripts/install_detectron2.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	bash scripts/install_detectron2.sh $(PY)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

$(WEB_STAMP): $(STAMP) requirements-web.txt
	$(PY) -m pip install --quiet -r requirements-web.txt
	touch $(WEB_STAMP)

# Debian's Chromium and its driver for the browser test, installed once; without apt or root the
# test cannot run, and this says so instead of letting it be skipped.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then exit 0; fi; \
	if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else \
		echo "make test: the browser test needs $(BROWSER) (Debian: apt-get install chromium chromium-driver, as root); install them and run make test again" >&2; \
		exit 1; \
	fi

quickstart: $(STAMP)
	$(PY) projects/GLIPv2/train_net.py --config-file configs/quickstart/train.yaml
	$(PY) tools/demo.py --config-file configs/quickstart/train.yaml \
		--categories-json datasets/glipv2_synthetic/annotations/val.json --input datasets/glipv2_synthetic/val \
		--max-images 4 --output output/quickstart/demo --score-threshold 0.45 \
		MODEL.WEIGHTS output/quickstart/model_final.pth
	$(PY) projects/GLIPv2/train_net.py --config-file configs/quickstart/mask.yaml
	$(PY) tools/demo.py --config-file configs/quickstart/mask.yaml \
		--categories-json datasets/glipv2_synthetic/annotations/val.json --input datasets/glipv2_synthetic/val \
		--max-images 4 --output output/quickstart_mask/demo --score-threshold 0.45 \
		MODEL.WEIGHTS output/quickstart_mask/model_final.pth

quickstart-vl: $(STAMP)
	test -f output/quickstart/model_final.pth || $(MAKE) quickstart
	$(PY) projects/GLIPv2/train_net.py --config-file configs/quickstart/vqa.yaml
	$(PY) tools/demo.py --task vqa --config-file configs/quickstart/vqa.yaml \
		--input datasets/glipv2_synthetic/val/000001.png --question "how many squares are there?" --phrases squares \
		--output output/quickstart_vqa/demo MODEL.WEIGHTS output/quickstart_vqa/model_final.pth
	$(PY) projects/GLIPv2/train_net.py --config-file configs/quickstart/caption.yaml
	$(PY) tools/demo.py --task caption --config-file configs/quickstart/caption.yaml \
		--input datasets/glipv2_synthetic/val/000001.png \
		--output output/quickstart_caption/demo MODEL.WEIGHTS output/quickstart_caption/model_final.pth

demo: $(STAMP)
	@if [ -f output/quickstart_mask/model_final.pth ] && [ -f datasets/glipv2_synthetic/annotations/val.json ]; then \
		$(PY) tools/demo.py --config-file configs/quickstart/mask.yaml \
			--categories-json datasets/glipv2_synthetic/annotations/val.json --input datasets/glipv2_synthetic/val \
			--max-images 2 --output output/demo --score-threshold 0.45 MODEL.WEIGHTS output/quickstart_mask/model_final.pth; \
	elif [ -f output/quickstart/model_final.pth ] && [ -f datasets/glipv2_synthetic/annotations/val.json ]; then \
		$(PY) tools/demo.py --config-file configs/quickstart/train.yaml \
			--categories-json datasets/glipv2_synthetic/annotations/val.json --input datasets/glipv2_synthetic/val \
			--max-images 2 --output output/demo --score-threshold 0.45 MODEL.WEIGHTS output/quickstart/model_final.pth; \
	else \
		echo "make demo: UNTRAINED weights (scores near 0.01, so no box is drawn); 'make quickstart' trains them (about 18 minutes on 2 CPU cores), then 'make demo' draws the trained model's boxes"; \
		$(PY) tools/demo.py --config-file configs/quickstart/demo.yaml --builtin-image astronaut \
			--categories "person,rocket,flag" --output output/demo; \
	fi

web-demo: $(WEB_STAMP)
	$(PY) tools/web_demo.py

test: $(STAMP) $(WEB_STAMP) browser
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

benchmark: $(STAMP)
	$(PY) tools/benchmark.py --config-file configs/glipv2_T.yaml
