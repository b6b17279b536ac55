# Every target sets itself up: `make init` builds .venv once (stamp file) on a fresh machine.
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed
TORCH_PIN ?= torch==2.13.0
PARITY_PROFILE ?= ci
# ci is derandomized (the seed is fixed by hypothesis); thorough draws a fresh seed unless given one
ifeq ($(origin PARITY_SEED),undefined)
PARITY_SEED := $(if $(filter thorough,$(PARITY_PROFILE)),$(shell $(PY) -c 'import random; print(random.randrange(2**16))'),0)
endif

.PHONY: init test parity parity-thorough parity-mutants lint train bench bench-scaling clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[torch,jax,dev,hf]"
	touch $(STAMP)

init: $(STAMP)

test: init
	$(BIN)/python -m pytest -q -p no:cacheprovider tests parity_tests

parity: init
	@echo "parity: profile $(PARITY_PROFILE), seed $(PARITY_SEED) (repeat: make parity PARITY_PROFILE=$(PARITY_PROFILE) PARITY_SEED=$(PARITY_SEED))"
	HYPOTHESIS_PROFILE=$(PARITY_PROFILE) $(BIN)/python -m pytest -q -p no:cacheprovider --hypothesis-seed=$(PARITY_SEED) parity_tests
	$(BIN)/python -m llm.parity --config configs/tiny.yaml --steps 20 --seed $(PARITY_SEED)

parity-thorough:
	$(MAKE) parity PARITY_PROFILE=thorough

# Every planted bug of parity_tests/mutants.py against every check it names (make test runs a fast subset).
parity-mutants: init
	PARITY_MUTANTS=all HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest -q -p no:cacheprovider parity_tests/test_mutants.py

lint: init
	$(BIN)/python -m ruff check llm backends tests parity_tests benchmarks conftest.py

train: init
	$(BIN)/python -m llm.train $(ARGS)

bench: init
	$(BIN)/python benchmarks/throughput.py $(ARGS)

bench-scaling: init
	$(BIN)/python benchmarks/scaling.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache
