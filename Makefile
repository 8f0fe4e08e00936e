# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv, install peftplan, estimate memory for a bundled example
#   make test   - create .venv, install peftplan with the training stack, run the tests
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test bench schema clean

$(VENV)/.base: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	touch $@

# torch first, pinned, so that nothing that depends on it pulls a multi-GB CUDA build.
$(VENV)/.train: $(VENV)/.base constraints.txt
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[train,dev]"
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/peftplan estimate examples/llama3-8b-lora-a100.toml

test: $(VENV)/.train
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q

bench: $(VENV)/.base
	$(PY) benchmarks/cold_start.py

schema: $(VENV)/.base
	$(VENV)/bin/peftplan schema > schemas/spec.schema.json

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
