# One-command set-up: `make demo` (the main job) and `make test` (the test suite) each create the
# virtual environment on first use: torch's CPU build first, then this package with its test, onnx and
# openvino extras (the export tests run ONNX Runtime and OpenVINO).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,onnx,openvino]"
	touch $(STAMP)

.PHONY: install test demo
install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/mask2anomaly-predict --model demo_model --output-dir outputs/demo samples/
