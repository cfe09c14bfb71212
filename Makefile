# The whole set-up on a fresh machine is `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# torch goes first and pinned: an unpinned torch pulls the newest CUDA build and several GB of
# nvidia packages. With 2.13.0 present, the constraints keep everything else from replacing it.
TORCH := torch==2.13.0
# No usage reports from the tools under test (MLflow, Prefect, the Hugging Face hub); exported to every
# recipe, so to the servers the tests start too.
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install browser demo test test-fast bench serve stop clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pipeline.torchvision_hook install
	touch $@

demo: $(INSTALLED)
	$(BIN)/ituning demo

# The web page's tests drive a real browser; Playwright cannot download its own here, so they use
# Debian's chromium (installed when missing and apt-get is at hand).
browser:
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  { echo "the tests need Chromium: install Debian's chromium package (apt-get install chromium)"; exit 1; }

# Three workers (pytest-xdist) on two cores: the suite waits on servers and subprocesses part of the time. The
# tests that share the session's servers run on one of them (tests/conftest.py). The slowest 25 are listed at the end.
TEST_WORKERS ?= 3
test: $(INSTALLED) browser
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder --durations=25

# The inner loop: no test marked slow, so no server, browser or pipeline run.
test-fast: $(INSTALLED)
	$(BIN)/python -m pytest -m "not slow" -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder --durations=10

bench: $(INSTALLED)
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/beam_decoding.py
	$(BIN)/python benchmarks/feature_cache.py
	$(BIN)/python benchmarks/training_throughput.py
	$(BIN)/python benchmarks/catalog_build.py
	$(BIN)/python benchmarks/cli_startup.py

serve: $(INSTALLED)
	$(BIN)/ituning serve

stop:
	$(BIN)/ituning stop

clean:
	rm -rf $(VENV) workspace
