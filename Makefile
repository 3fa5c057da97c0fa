# `make demo`: the full SFT -> GRPO pipeline on the embedded tiny model, offline, on CPU.
# `make test`: the test suite. Both create .venv when missing and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUTPUT ?= output

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	@bash scripts/setup.sh "$(PYTHON)" "$(VENV)"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) cli.py train --model tiny --mode full --backend torch --output-dir $(OUTPUT)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/time_to_accuracy.py

clean:
	rm -rf $(OUTPUT) .pytest_cache
