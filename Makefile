# One-command set-up: `make demo` (the main job) and `make test` (the test suite) each create the
# virtual environment on first use: torch's CPU build first, then this package with its test extra.
# `make browser` installs Debian's chromium for the Space's browser test (root and apt-get; .ci/run calls it).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= outputs/demo

# pip -q keeps the set-up to a few lines. setuptools' one remaining note on an editable install ("Editable
# installation": a package_dir layout is served through an import finder) is information, not a problem to fix.
$(STAMP): setup.cfg pyproject.toml
	@echo "Setting up $(VENV): torch (CPU build), then this package with its test extra (a minute or two)"
	@$(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q torch==2.13.0
	@PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

.PHONY: install test demo browser
install: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check --quiet .
	$(PY) -m pytest -q -n auto --dist loadgroup tests

demo: $(STAMP)
	@$(VENV)/bin/mask2anomaly-predict --model demo_model --output-dir $(DEMO_OUT) samples/
	@echo "Demo outputs (per image: _anomaly.npy scores, _heatmap.png, _semantic.png) are in $(DEMO_OUT)/"

browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
