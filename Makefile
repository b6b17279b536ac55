# Every target sets itself up: `make init` builds .venv once (stamp file) on a fresh machine.
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed
TORCH_PIN ?= torch==2.13.0
PARITY_PROFILE ?= ci
# The parity suite's seed (parity_tests/conftest.py, printed in the pytest header): ci is seeded from
# the commit, thorough draws fresh seeds; PARITY_SEED=N replays a run (both the suite and the CLI).
ifdef PARITY_SEED
export PARITY_SEED
endif

.PHONY: init test test-slow test-dist parity parity-thorough parity-mutants lint train bench bench-scaling clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[torch,jax,dev,hf]"
	touch $(STAMP)

init: $(STAMP)

# --durations: the slowest items, printed by every run (CI's log says where the time goes).
test: init
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25 tests parity_tests

# The heavy cases marked slow (make test holds each property with a smaller case): the drawn specs
# of the 20-step trajectory parity test.
test-slow: init
	LLM_TEST_SLOW=1 $(BIN)/python -m pytest -q -p no:cacheprovider --durations=25 -m slow tests parity_tests

# Sharded training against one device (minutes): the torchrun sweep (CPU, gloo: torch fsdp / tensor /
# fsdp x tensor, the cross-mesh resume) and JAX on 8 forced host devices.
test-dist: init
	LLM_TEST_DIST=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_torch_sharding.py tests/test_flax_sharding.py

parity: init
	LLM_TEST_SLOW=1 HYPOTHESIS_PROFILE=$(PARITY_PROFILE) $(BIN)/python -m pytest -q -p no:cacheprovider parity_tests
	$(BIN)/python -m llm.parity --config configs/tiny.yaml --steps 20 --seed $(or $(PARITY_SEED),0)

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
