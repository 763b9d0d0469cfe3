# Every target installs what it needs: a fresh clone needs nothing else.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
# checkov pins packaging 23.2 and networkx < 2.7, older than torch and transformers need: it gets a venv of its own.
CHECKOV_VENV ?= .venv-checkov
CHECKOV_VERSION := 3.3.30
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION)
DEB_PACKAGES := prometheus espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts sox ffmpeg libsndfile1 chromium
MODEL ?= model_store/default
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test venv system-deps default-model esc10-table gpu-wheels clean

serve: $(STAMP)
	@test -f $(MODEL)/card.json || { echo "make serve: no model at $(MODEL) (run 'make default-model' or set MODEL=DIR)"; exit 1; }
	$(VENV)/bin/fastast serve --model $(MODEL) --host $(HOST) --port $(PORT)

test: $(STAMP) $(CHECKOV_STAMP) system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

venv: $(STAMP)

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

$(CHECKOV_STAMP):
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install -q --upgrade pip
	$(CHECKOV_VENV)/bin/python -m pip install -q 'checkov==$(CHECKOV_VERSION)'
	touch $@

# Debian packages used by the tests (real Prometheus, espeak-ng, flite and festival speech, sox, headless Chromium for /docs); installed only when missing.
system-deps:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

# Reproduce model_store/default end to end: real and synthetic data, synthetic student, real fine-tune, tables on real speakers.
default-model: $(STAMP) system-deps
	bash scripts/default_model.sh

# The paper's table on real recordings: ESC-10 from scratch, fold-5 test (FOLDS="1 2 3 4 5" cross-validates);
# ships model_store/esc10 if it reaches 75 %.
esc10-table: $(STAMP)
	bash scripts/esc10_table.sh

# The serving dependencies the GPU host lacks, as CPython 3.12 wheels in .whl/ (git-ignored), for scripts/gpu_check.sh.
GPU_WHEELS := fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv typing-inspection annotated-types \
	annotated-doc typing-extensions uvicorn httptools python-multipart soundfile cffi pycparser soxr pyzmq fastapi-offline
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_26_x86_64 -d .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) .pytest_cache build service/*.egg-info
