# optitrainer — the front door. `make install` then `make test` (or `make demo`).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build by default; a GPU user may pass e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH  ?= torch==2.13.0
PLUGINS := $(sort $(wildcard plugins/optitrainer-*))
PYTEST_ARGS ?=

.PHONY: install test check-all test-distributed-sweep test-bridge-sweep test-bnb-full demo bench bench-gpu lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip setuptools wheel
	@# torch first: asking pip for an unpinned torch (as a dependency) would pull several GB of CUDA wheels
	$(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e ".[test,bench]"
	$(BIN)/python -m pip install $(foreach p,$(PLUGINS),-e $(p))
	$(BIN)/optitrainer list

test:
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# the conformance kit over every registered name and form (CI checks the core, every small distribution
# in full and a sample of the large ones)
check-all:
	OPTITRAINER_CHECK_ALL=1 $(BIN)/python -m pytest -q tests/test_conformance.py $(PYTEST_ARGS)

# every registered name and layerwise form that claims DDP, through torchrun (CI runs a sample)
test-distributed-sweep:
	OPTITRAINER_DIST_SWEEP=1 $(BIN)/python -m pytest -q tests/test_distributed.py $(PYTEST_ARGS)

# every name and layerwise form of the pytorch-optimizer bridge through the kit (CI runs a sample)
test-bridge-sweep:
	OPTITRAINER_BRIDGE_SWEEP=1 $(BIN)/python -m pytest -q plugins/optitrainer-pytorch-optimizer/tests/test_sweep.py $(PYTEST_ARGS)

# every bitsandbytes name through parity with transformers, layerwise, resume and DDP (CI runs a sample)
test-bnb-full:
	OPTITRAINER_BNB_FULL=1 $(BIN)/python -m pytest -q plugins/optitrainer-bitsandbytes $(PYTEST_ARGS)

demo:
	$(BIN)/python examples/demo.py

bench:
	$(BIN)/optitrainer bench --optim adamw_torch,adamw_torch_layerwise,galore_adamw_layerwise,adalomo --baseline transformers

# on a GPU machine: a 1.1B Llama from examples/bench/llama-1b.json in bf16, the guide's optimizers against
# transformers.Trainer, allocator peak vs floor (results and plots in bench-results/gpu-1b)
GPU_OPTIMS ?= adamw_torch,adamw_torch_fused,adafactor,adamw_bnb_8bit,galore_adamw,galore_adamw_layerwise,apollo_adamw,apollo_adamw_layerwise,lomo,adalomo,schedule_free_adamw,grokadamw,stable_adamw
bench-gpu:
	$(BIN)/optitrainer bench --model examples/bench/llama-1b.json --dtype bfloat16 --device cuda --optim $(GPU_OPTIMS) --batch-size 4 --seq-len 512 --steps 10 --warmup-steps 3 --mem-steps 2 --baseline transformers --out bench-results/gpu-1b

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build dist *.egg-info plugins/*/*.egg-info .pytest_cache bench-results
