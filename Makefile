# diffusax: the README's commands. Every target creates the virtual environment if needed and
# installs only what it needs: train/sample/eval/info/latents the runtime packages (`-e .`), the
# tests and the CPU benchmarks the test extra as well (torch, diffusers, tensorflow-cpu...), lint
# only ruff (the `lint` extra of pyproject.toml, pinned).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXP ?= ddpm_digits
WORKDIR ?= runs/$(EXP)
ARGS ?=
LINT_PATHS := src tests benchmarks experiments notebooks

.PHONY: install install-test test drills lint train sample eval info latents interpolate variations \
	bench bench-dit \
	bench-sd bench-lcm bench-dit-gpu clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Runtime packages only: what training, sampling and evaluation import.
$(VENV)/.installed-run: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

# The test suite's extra packages on top (the torch/diffusers oracles, TFDS's TensorFlow, Jupyter).
$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# ruff alone, at the version pinned in pyproject.toml's `lint` extra (no need for the package).
LINT_REQUIREMENTS := $(PY) -c "import tomllib; \
	print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['lint'])"
$(VENV)/.installed-lint: pyproject.toml | $(PY)
	$(PY) -m pip install -q $$($(LINT_REQUIREMENTS))
	touch $@

install: $(VENV)/.installed-run

install-test: $(VENV)/.installed-test

# Test files run in TEST_WORKERS processes (pytest-xdist), each file whole in one of them, so a
# file's module fixtures are built once: XLA's CPU compiler, most of the suite's time, uses one
# core, and a second process keeps the other busy. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25 tests

# ruff's lint rules and formatting (pyproject.toml [tool.ruff]); fixes nothing.
lint: $(VENV)/.installed-lint
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)

# The reliability drills alone (RELIABILITY.md: kills, SIGTERM, damaged checkpoints, NaN, bad
# input, device counts, two hosts); `make test` runs them too.
drills: $(VENV)/.installed-test
	$(PY) -m pytest -q tests/test_drills_kill.py tests/test_drills_damage.py \
		tests/test_drills_input.py tests/test_drills_topology.py

clean:
	rm -rf $(VENV) runs .pytest_cache

RUN := $(PY) -m diffusax.main --config=experiments/$(EXP).py --workdir=$(WORKDIR)

# Train the experiment EXP (default: the bundled digits). Resumes from WORKDIR if it holds a run.
train: $(VENV)/.installed-run
	$(RUN) --mode=train $(ARGS)

# Draw samples from the trained EMA model: WORKDIR/samples/samples.npz and a grid PNG.
sample: $(VENV)/.installed-run
	$(RUN) --mode=sample $(ARGS)

# Sample quality (Fréchet distance in a digits classifier's features) and bits per dimension.
eval: $(VENV)/.installed-run
	$(RUN) --mode=eval $(ARGS)

# A walk between two conditions (two classes; an unCLIP run: two images' embeddings), and an
# unCLIP run's decoded variations of an image: WORKDIR/samples/interpolate_*.png, variations_*.png.
interpolate: $(VENV)/.installed-run
	$(RUN) --mode=interpolate $(ARGS)

variations: $(VENV)/.installed-run
	$(RUN) --mode=variations $(ARGS)

# Latent experiments (dit_xl2): encode latents.source once with the frozen VAE into latents.dir.
# Resumable: run it again after an interruption and it continues with the next shard.
latents: $(VENV)/.installed-run
	$(RUN) --mode=latents $(ARGS)

# What a run would use: parameters, FLOPs, mesh, dataset, method and sampler. Trains nothing.
info: $(VENV)/.installed-run
	$(RUN) --mode=info $(ARGS)

# Speed of ddpm_digits against the same model in diffusers on CPU (train steps/s, samples/s);
# records benchmarks/results/. `make bench ARGS=--quick` is a smoke test that records nothing.
bench: $(VENV)/.installed-test
	$(PY) benchmarks/bench_digits.py $(ARGS)

# DiT-S/2 and DiT-B/2 training images/s and peak memory against diffusers' DiT on CPU;
# records benchmarks/results/. `make bench-dit ARGS=--quick` is a smoke test.
bench-dit: $(VENV)/.installed-test
	$(PY) benchmarks/bench_dit.py $(ARGS)

# Stable Diffusion v1.5 U-Net seconds per call (batch 1, and 2 = a guided step) against
# diffusers' UNet2DConditionModel on CPU, random init; records benchmarks/results/.
# `make bench-sd ARGS=--quick` is a smoke test (a small U-Net) that records nothing.
bench-sd: $(VENV)/.installed-test
	$(PY) benchmarks/bench_sd_unet.py $(ARGS)

# The few-step students (lcm_digits, lcm_lora_digits) against their teacher: images/s and FD
# at 1-8 steps vs DDIM; records benchmarks/results/ (train the runs first).
bench-lcm: $(VENV)/.installed-run
	$(PY) benchmarks/bench_lcm.py $(ARGS)

# DiT-XL/2 images/s and MFU on the local GPUs (needs jax's CUDA build: pip install -e '.[cuda]');
# records benchmarks/results/. `make bench-dit-gpu ARGS=--dry-run` checks it on any machine.
bench-dit-gpu: $(VENV)/.installed-run
	$(PY) benchmarks/gpu_dit_mfu.py $(ARGS)
