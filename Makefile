# The README's two commands: `make demo` (the main job) and `make test` (the test suite).
# Both create the virtual environment on first use, so a fresh machine needs only python3 and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint docs tutorials clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,docs]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m captum_inn demo $(ARGS)

# one worker per CPU core (pytest-xdist), each test file on one worker so that its fixtures are built once;
# the tests run torch on one thread each. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= auto
test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# executes every notebook in tutorials/ (ARGS=--ci: small settings; --inplace: write the outputs back)
tutorials: $(STAMP)
	$(PY) tutorials/run.py $(ARGS)

docs: $(STAMP)
	$(VENV)/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) docs/_build docs/tutorials tutorial_runs captum_inn_report captum_inn_photo_report .pytest_cache
