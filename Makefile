# Two entry points: `make run` (the main job) and `make test` (the test suite).
# Both create the virtualenv and install the project when needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/lifelong run examples/configs/stdlib_text.yaml --output runs/stdlib_text --resume
	HF_HUB_OFFLINE=1 $(BIN)/lifelong run examples/configs/stdlib_text_class_incremental.yaml --output runs/stdlib_text_ci --resume

test: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/pytest -q --durations=20

clean:
	rm -rf $(VENV) build *.egg-info
