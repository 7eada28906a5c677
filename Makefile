# The two commands a user needs on a fresh machine: `make demo` and `make test`.
# Everything else is here so the README's commands are one word each.

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
LOCK        ?= requirements.lock
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
LATEST_VENV ?= .cache/venv-latest
LOCK_VENV   ?= .cache/venv-lock
DEMO_DIR    ?= runs/demo
DATA_DIR    ?= data/demo
PYTEST_ARGS ?=
# pytest-xdist workers: one per core, at most 4 (a recipe test launches two ranks of its own, and each worker
# holds its own torch and tiny models)
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))
DEMO_ARGS   ?=

export PYTHONPATH := $(CURDIR)
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo test test-latest lint bench lock ensemble sft grpo infer clean

venv: $(STAMP)

# torch goes first and pinned (TORCH_SPEC), so the CPU wheel is used here and a CUDA build on a GPU box;
# then exactly the versions in the lock ($(LOCK), everything but torch), then the project itself without
# resolving anything again. A changed lock or pyproject.toml reinstalls.
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m pip check
	touch $(STAMP)

# Re-resolve the lock to the newest versions pyproject.toml's ranges allow, with torch held at TORCH_SPEC
# (its CPU build must be what pip finds for that version; torch itself is left out of the lock).
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet "pip-tools>=7.4"
	echo "$(firstword $(TORCH_SPEC))" > $(LOCK_VENV)/torch.txt
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet --upgrade --strip-extras \
		--extra dev --unsafe-package torch --constraint $(LOCK_VENV)/torch.txt \
		--no-emit-find-links --no-emit-index-url --no-emit-trusted-host --output-file $(LOCK) pyproject.toml
	@echo "wrote $(LOCK); run 'make test' (it reinstalls .venv from the new lock) before committing it"

# A throwaway venv with the newest versions the ranges allow (torch at TORCH_SPEC), then the fast tests:
# drift in a dependency shows up here before it reaches a user.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install --quiet --upgrade pip
	$(LATEST_VENV)/bin/pip install --quiet $(TORCH_SPEC)
	echo "$(firstword $(TORCH_SPEC))" > $(LATEST_VENV)/torch.txt
	$(LATEST_VENV)/bin/pip install --quiet --upgrade --upgrade-strategy eager -c $(LATEST_VENV)/torch.txt -e ".[dev]"
	$(LATEST_VENV)/bin/pip list --format freeze | grep -i -E '^(torch|transformers|peft|deepspeed|datasets|accelerate)=='
	touch $(LATEST_VENV)/.installed
	$(LATEST_VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow and not lockfile" $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m demo --out $(DEMO_DIR) --data $(DATA_DIR) $(DEMO_ARGS)

# The suite runs on every core, up to 4 (pytest-xdist; TEST_WORKERS=1 for one process). A test file stays on one
# worker, so a module's fixture (the smoke demo) is built once; tests/conftest.py starts the longest first.
test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check aqa data_prep train inference ensemble bench demo tests

bench: $(STAMP)
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

ensemble: $(STAMP)
	$(PY) ensemble/fit.py --config configs/ensemble.yaml

# make sft|grpo [CONFIG=configs/qwen2_audio/sft.yaml] [GPUS=8] [ARGS="max_steps=10 ..."]
# GPUS defaults to the demo's 2 ranks: the default configs continue the demo's runs, and a checkpoint resumes
# only with the number of ranks that saved it.
GPUS   ?= 2
# a free port unless given: the launcher's 29500 may be held by another job on the machine
MASTER_PORT ?= $(shell $(PYTHON) -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
SPLIT  ?= dev
sft: $(STAMP)
	$(VENV)/bin/deepspeed --num_gpus $(GPUS) --master_port $(MASTER_PORT) train/sft.py --config $(or $(CONFIG),configs/demo/qwen2_audio_sft.yaml) $(ARGS)

grpo: $(STAMP)
	$(VENV)/bin/deepspeed --num_gpus $(GPUS) --master_port $(MASTER_PORT) train/grpo.py --config $(or $(CONFIG),configs/demo/qwen2_audio_grpo.yaml) $(ARGS)

infer: $(STAMP)
	$(PY) inference/run.py --config $(or $(CONFIG),configs/demo/qwen2_audio_infer.yaml) --split $(SPLIT) $(ARGS)

clean:
	rm -rf $(DEMO_DIR) $(DATA_DIR)
