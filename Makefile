# Entry points for people and CI. Each target installs what it lacks first.
#   make run         quantize the real MiniLM layer, generate RTL, simulate it, compare
#   make test        the whole test suite, Verilator co-simulation included
#   make test-fast   unit tests only (no Verilator, no model files)

CARGO ?= cargo
PYTHON ?= python3
ARGS ?=

.PHONY: all build run test test-fast fetch-models deps lint clean

all: build

build:
	$(CARGO) build --release

deps:
	bash scripts/install_tools.sh

fetch-models:
	$(PYTHON) scripts/fetch_models.py --all

run: deps fetch-models build
	./target/release/microscopiq run $(ARGS)

test: deps fetch-models
	$(CARGO) test --tests

test-fast:
	$(CARGO) test --lib

lint: deps build
	./target/release/microscopiq lint $(ARGS)

clean:
	$(CARGO) clean
