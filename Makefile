# optitrainer — the front door. `make install` then `make test` (or `make demo`).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build by default; a GPU user may pass e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH  ?= torch==2.13.0
PLUGINS := $(sort $(wildcard plugins/optitrainer-*))
PYTEST_ARGS ?=
# pinned versions, so that a new upstream release never changes a run by surprise; CONSTRAINTS= resolves afresh
CONSTRAINTS ?= constraints/ci.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: install test test-compat test-floor test-newest constraints check-all test-distributed-sweep test-bridge-sweep test-bnb-full demo bench bench-gpu bench-ddp-gpu lint format clean gpu-wheels gpu-check gpu-check-dry

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip setuptools wheel
	@# torch first: asking pip for an unpinned torch (as a dependency) would pull several GB of CUDA wheels
	$(BIN)/python -m pip install $(PIP_C) $(TORCH)
	$(BIN)/python -m pip install $(PIP_C) -e ".[test,bench]" $(foreach p,$(PLUGINS),-e $(p))
	$(BIN)/optitrainer list

test:
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The compatibility run: the focused subset (trainer contract, trainer, layerwise, clipping, LOMO, fallback,
# resume, DDP smoke) in a fresh venv at every declared floor (constraints/floor.txt: Python 3.10, torch 2.6,
# transformers 5.3, accelerate 1.3, rich 13, packaging 23) or at the newest releases (COMPAT=newest,
# unpinned: what a user installing today gets; not in CI, since a new release would change its result).
COMPAT ?= floor
COMPAT_VENV ?= .venv-$(COMPAT)
FLOOR_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10.*/bin/python3) python3.10)
COMPAT_PYTHON = $(if $(filter floor,$(COMPAT)),$(FLOOR_PYTHON),$(PYTHON))
COMPAT_PIP_C = $(if $(filter floor,$(COMPAT)),-c constraints/floor.txt)
COMPAT_TESTS ?= tests/test_trainer_contract.py tests/test_trainer.py tests/test_layerwise_clipping.py \
	tests/test_layerwise_vs_transformers.py tests/test_transformers_fallback.py tests/test_builtins.py \
	tests/test_arguments.py tests/test_engine.py tests/test_cli.py tests/test_distributed.py \
	plugins/optitrainer-lomo/tests plugins/optitrainer-galore/tests plugins/optitrainer-schedulefree/tests
test-compat:
	rm -rf $(COMPAT_VENV)
	$(COMPAT_PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q --upgrade pip
	@# at the floor: PyPI's torch 2.6.0 (a CUDA build, ~3 GB, runs on the CPU); newest: whatever pip resolves
	$(COMPAT_VENV)/bin/python -m pip install -q $(COMPAT_PIP_C) torch
	$(COMPAT_VENV)/bin/python -m pip install -q $(COMPAT_PIP_C) -e ".[deepspeed]" pytest matplotlib $(foreach p,$(PLUGINS),-e $(p))
	$(COMPAT_VENV)/bin/python -c "import sys, importlib.metadata as m; print('$(COMPAT):', 'Python', sys.version.split()[0], *(d + ' ' + m.version(d) for d in ('torch', 'transformers', 'accelerate', 'rich', 'packaging', 'deepspeed')))"
	$(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider $(COMPAT_TESTS) $(PYTEST_ARGS)

# ... then forces the release below the floor into the same venv: OptiTrainer must refuse it before step 1
BELOW_FLOOR ?= transformers==5.2.0
test-floor:
	$(MAKE) test-compat COMPAT=floor
	.venv-floor/bin/python -m pip install -q $(BELOW_FLOOR)
	.venv-floor/bin/python -m pytest -q -p no:cacheprovider tests/test_trainer_contract.py \
		-k installed_release_is_accepted_exactly_when_it_is_in_range

test-newest:
	$(MAKE) test-compat COMPAT=newest

# constraints/ci.txt from the installed .venv (after a green `make install CONSTRAINTS= && make test`)
constraints:
	{ sed -n '1,2p' constraints/ci.txt; $(BIN)/python -m pip freeze --exclude-editable | grep -v '^#' | sed 's/+cpu$$//'; } > constraints/ci.txt.new
	mv constraints/ci.txt.new constraints/ci.txt

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

# on a machine with NGPUS GPUs: bench --ddp's command of docs/benchmarks.md over NCCL, one GPU per rank
NGPUS ?= 2
bench-ddp-gpu:
	$(BIN)/optitrainer bench --ddp $(NGPUS) --device cuda --model 8x512 --batch-size 2 --seq-len 64 --steps 16 --warmup-steps 3 --out bench-results/ddp-gpu

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build dist *.egg-info plugins/*/*.egg-info .pytest_cache bench-results

# --- the GPU proof in one call (docs/benchmarks.md, "GPU check") ---------------------------------------
# The lent GPU machine has no network: the upstream packages of the checked optimizers (one version each,
# pinned as the plugins pin them) and optitrainer with its plugins (entry points need installed wheels)
# travel as wheels in .whl/ (git-ignored; carried with the tree, 64 MiB in all). On that machine:
# `bash tools/gpu_check.sh` installs them into /tmp/site and runs the check.
GPU_WHEELS_DIR := .whl
GPU_WHEELS_MAX_MIB := 60
GPU_UPSTREAM := bitsandbytes==0.50.2 galore-torch==1.0 apollo-torch==1.0.3 lomo-optim==0.1.1 \
	schedulefree==1.4.1 torch-optimi==0.3.3 grokadamw==0.1.2 prodigyopt==1.1.2 adam-mini==1.1.1 badam==1.4 \
	pytorch-optimizer==4.1.0
GPU_PLATFORM := --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
	--platform manylinux2014_x86_64 --platform manylinux1_x86_64
# the venv's python here; python3 on the GPU machine (no venv there)
GPU_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))

gpu-wheels:
	@# stale build/ folders would put deleted modules into the wheels
	rm -rf $(GPU_WHEELS_DIR) build $(addsuffix /build,$(PLUGINS))
	$(BIN)/python -m pip download --no-deps --only-binary=:all: $(GPU_PLATFORM) -d $(GPU_WHEELS_DIR) $(GPU_UPSTREAM)
	$(BIN)/python -m pip wheel --no-deps --no-build-isolation -w $(GPU_WHEELS_DIR) . $(PLUGINS)
	rm -rf build $(addsuffix /build,$(PLUGINS))
	@total=$$(cat $(GPU_WHEELS_DIR)/*.whl | wc -c); \
	echo "$(GPU_WHEELS_DIR): $$(ls $(GPU_WHEELS_DIR)/*.whl | wc -l) wheels, $$total bytes ($$((total / 1048576)) MiB; limit $(GPU_WHEELS_MAX_MIB) MiB)"; \
	if [ $$total -gt $$(($(GPU_WHEELS_MAX_MIB) * 1048576)) ]; then echo "$(GPU_WHEELS_DIR) exceeds $(GPU_WHEELS_MAX_MIB) MiB: the tree must stay under 64 MiB" >&2; exit 1; fi

# every optimizer of the seed guide on the 1.1B Llama, one process, <= 8 min on one H100 (needs CUDA)
gpu-check:
	$(GPU_PY) -m optitrainer.bench.gpu_check $(GPU_CHECK_ARGS)

# the same code on the CPU with the tiny Llama (CI runs it through tests/test_gpu_check.py)
gpu-check-dry:
	$(GPU_PY) -m optitrainer.bench.gpu_check --dry-run --out bench-results/gpu-check-dry $(GPU_CHECK_ARGS)
