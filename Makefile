# Two commands do their own set-up on a fresh machine: `make demo` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
CXR    := $(VENV)/bin/cxr
STAMP  := $(VENV)/.installed-stamp
DEMO   := --profile demo

.PHONY: setup demo test test-deps test-fast lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# The main job on generated data, CPU only: synthesise -> ingest (Ray tasks) -> train CNN, its linear probe (the
# report's sanity baseline, latest-cnn-probe.json) and ViT (Ray Train, 2 DDP workers each, MLflow) -> tune the gate
# (Ray Tune, stage B) -> evaluate -> serve (Ray Serve) and send a few test images over HTTP. A fresh run name per
# demo, so it never resumes an older one.
RUN    := $(shell date +%Y%m%d-%H%M%S)
demo: setup
	$(CXR) synth $(DEMO) --overwrite
	$(CXR) ingest $(DEMO) --overwrite
	$(CXR) train $(DEMO) --model cnn --run-name cnn-$(RUN)
	$(CXR) train $(DEMO) --model cnn --run-name cnn-probe-$(RUN) --set train.recipe=linear_probe --set train.epochs=3
	$(CXR) train $(DEMO) --model vit --run-name vit-$(RUN)
	$(CXR) tune ensemble $(DEMO)
	$(CXR) evaluate $(DEMO)
	$(CXR) serve $(DEMO) --try 6 --no-block

# The whole suite: tests/unit (no Ray), tests/ray (one shared local Ray), tests/e2e (Serve over HTTP, the web page
# in chromium, the local multi-node cluster). test-deps installs chromium and redis-server where it can (root,
# apt-get); where it cannot, it says which tests will skip.
test: setup test-deps
	$(PY) -m pytest -q

test-deps:
	.ci/test-deps

# The unit tier only: never starts Ray, about a minute on 2 cores.
test-fast: setup
	$(PY) -m pytest -q tests/unit

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf runs .pytest_cache
