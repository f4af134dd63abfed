# The two set-up commands of the README: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test
install: $(VENV)/.fap-installed

$(VENV)/.fap-installed: pyproject.toml .ci/install.sh
	bash .ci/install.sh $(VENV)
	touch $@

demo: install
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no recipes/demo.py

test: install
	$(PY) -m pytest -q tests
