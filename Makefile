# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv with the training stack, plan a bundled example, then build, generate and
#                 train the offline quickstart on the CPU (about a minute)
#   make test   - the same environment, then the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test bench schema docs clean

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

demo: $(VENV)/.train
	$(VENV)/bin/peftplan plan examples/dora-little-data.toml
	$(PY) examples/quickstart/build.py
	$(VENV)/bin/peftplan plan examples/quickstart/spec.toml
	rm -rf out/quickstart
	$(VENV)/bin/peftplan generate examples/quickstart/spec.toml -o out/quickstart
	HF_HUB_OFFLINE=1 $(VENV)/bin/peftplan run out/quickstart

test: $(VENV)/.train
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q

bench: $(VENV)/.train
	bash benchmarks/run_all.sh

schema: $(VENV)/.base
	$(VENV)/bin/peftplan schema > schemas/spec.schema.json

# docs/cli.md and docs/spec.md are generated from the parser and the spec's models (a test checks they are current)
docs: $(VENV)/.base schema
	$(PY) -c "from peftplan.parser import markdown; open('docs/cli.md', 'w').write(markdown())"
	$(PY) -c "from peftplan.schemas.reference import markdown; open('docs/spec.md', 'w').write(markdown())"

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
