# The two set-up commands of the README: `make demo` (the main job) and `make test`.
# `make bench`: the step-cost benchmark (benchmarks/step_cost.py = `fap bench`).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test bench
install: $(VENV)/.fap-installed

$(VENV)/.fap-installed: pyproject.toml .ci/install.sh
	bash .ci/install.sh $(VENV)
	touch $@

demo: install
	$(PY) recipes/demo.py

test: install
	$(PY) -m pytest -q -m "not matrix" tests

bench: install
	$(PY) benchmarks/step_cost.py

# `make test` (CI) runs everything but the off-diagonal cases of the exactness matrix
# (marker `matrix`, about 20 min on 2 cores); `make test-slow` runs every test marked slow,
# the full matrix included.
.PHONY: test-slow
test-slow: install
	$(PY) -m pytest -q -m slow tests
