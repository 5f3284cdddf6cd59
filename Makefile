# diffusax: the README's commands. Every target creates the virtual environment if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXP ?= ddpm_digits
WORKDIR ?= runs/$(EXP)
ARGS ?=

.PHONY: install test train sample eval info bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs .pytest_cache

RUN := $(PY) -m diffusax.main --config=experiments/$(EXP).py --workdir=$(WORKDIR)

# Train the experiment EXP (default: the bundled digits). Resumes from WORKDIR if it holds a run.
train: $(VENV)/.installed
	$(RUN) --mode=train $(ARGS)

# Draw samples from the trained EMA model: WORKDIR/samples/samples.npz and a grid PNG.
sample: $(VENV)/.installed
	$(RUN) --mode=sample $(ARGS)

# Sample quality (Fréchet distance in a digits classifier's features) and bits per dimension.
eval: $(VENV)/.installed
	$(RUN) --mode=eval $(ARGS)

# What a run would use: parameters, FLOPs, mesh, dataset, method and sampler. Trains nothing.
info: $(VENV)/.installed
	$(RUN) --mode=info $(ARGS)

# Speed of ddpm_digits against the same model in diffusers on CPU (train steps/s, samples/s);
# records benchmarks/results/. `make bench ARGS=--quick` is a smoke test that records nothing.
bench: $(VENV)/.installed
	$(PY) benchmarks/bench_digits.py $(ARGS)
