# `make demo` and `make test` each set themselves up on a fresh machine (venv + install).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision are pinned to a matching pair; override for another platform/CUDA build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo demo-lm test venv clean gpu-data

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test,ray,slurm,datasets]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/incubate run --recipe recipes/quickstart.yaml --out runs/quickstart

demo-lm: venv
	$(VENV)/bin/incubate run --recipe recipes/quickstart_lm.yaml --out runs/quickstart_lm

# Two workers (pytest-xdist), a file's tests on one (its module fixtures built once), files with slow
# tests first (tests/conftest.py), hence no reordering by size. TEST_WORKERS=0: one process.
# (--dist loadgroup would be finer, but pytest-xdist 3.8 cannot group under pytest 9.)
TEST_WORKERS ?= 2
test: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

# Fashion-MNIST into data/fashion-mnist (git-ignored, 30 MiB) and the token study's prose into
# data/lm_corpus (13 MiB, gzipped) for benchmarks/gpu_run.sh to carry to a GPU machine; from Debian's
# dataset-fashion-mnist, python3.11-doc and linux-doc-6.1, installed if missing (as root).
FMNIST := /usr/share/datasets/fashion-mnist
gpu-data: venv
	test -f $(FMNIST)/train-images-idx3-ubyte.gz || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)
	mkdir -p data/fashion-mnist && cp $(FMNIST)/*-ubyte.gz data/fashion-mnist/
	$(PY) -m benchmarks.token_study

clean:
	rm -rf runs/quickstart runs/quickstart_lm
