# `make demo`: the full SFT -> GRPO pipeline on the embedded tiny model, offline, on CPU.
# `make test`: the test suite. Both create .venv when missing and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OUTPUT ?= output

.PHONY: demo test bench clean
.PRECIOUS: $(VENV)/.installed-%

# demo installs the backend this machine trains with (MLX on Apple Silicon, else PyTorch); tests need both
$(VENV)/.installed-%: pyproject.toml scripts/setup.sh
	@bash scripts/setup.sh "$(PYTHON)" "$(VENV)" $*
	@touch $@

demo: $(VENV)/.installed-demo
	$(PY) cli.py train --model tiny --mode full --backend auto --output-dir $(OUTPUT)

test: $(VENV)/.installed-all
	$(PY) -m pytest -q

bench: $(VENV)/.installed-bench
	$(PY) bench/run.py --json bench/results.json

clean:
	rm -rf $(OUTPUT) .pytest_cache
