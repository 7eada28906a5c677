# The two commands a user needs on a fresh machine: `make demo` and `make test`.
# Everything else is here so the README's commands are one word each.

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
DEMO_DIR    ?= runs/demo
DATA_DIR    ?= data/demo
PYTEST_ARGS ?=

export PYTHONPATH := $(CURDIR)
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo test lint bench ensemble sft grpo infer clean

venv: $(STAMP)

# torch goes first and pinned (TORCH_SPEC), so the CPU wheel is used here and a CUDA build on a GPU box;
# the project's ranges are then satisfied by it and nothing larger is pulled in.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m aqa.demo --out $(DEMO_DIR) --data $(DATA_DIR)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check aqa data_prep train inference ensemble bench tests

bench: $(STAMP)
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

ensemble: $(STAMP)
	$(PY) ensemble/fit.py --config configs/ensemble.yaml

# make sft|grpo [CONFIG=configs/qwen2_audio/sft.yaml] [GPUS=8] [ARGS="max_steps=10 ..."]
GPUS   ?= 1
SPLIT  ?= dev
sft: $(STAMP)
	$(VENV)/bin/deepspeed --num_gpus $(GPUS) train/sft.py --config $(or $(CONFIG),configs/demo/qwen2_audio_sft.yaml) $(ARGS)

grpo: $(STAMP)
	$(VENV)/bin/deepspeed --num_gpus $(GPUS) train/grpo.py --config $(or $(CONFIG),configs/demo/qwen2_audio_grpo.yaml) $(ARGS)

infer: $(STAMP)
	$(PY) inference/run.py --config $(or $(CONFIG),configs/demo/qwen2_audio_infer.yaml) --split $(SPLIT) $(ARGS)

clean:
	rm -rf $(DEMO_DIR) $(DATA_DIR)
