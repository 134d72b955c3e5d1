# Two entry points for a fresh machine: `make run` and `make test`.
# Each creates its own virtual environment in .venv when it is missing.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test deps clean

# The editable install uses a plain .pth path entry (compat mode): setuptools'
# default editable finder hides twisted/plugins from Twisted's plugin scanner.
$(BIN)/twistd: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $(BIN)/twistd

run: $(BIN)/twistd
	$(BIN)/twistd --nodaemon --pidfile= broker $(if $(CONFIG),--config $(CONFIG))

deps:
	sh .ci/debian-packages

test: deps $(BIN)/twistd
	$(BIN)/python tests/run.py

clean:
	rm -rf $(VENV) _trial_temp* build *.egg-info
