# Every target works from a fresh clone: the first one that needs Python creates .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Running needs only the project's own dependencies; tests, lint and benchmarks add the dev tools.
RUN_STAMP := $(VENV)/.installed-run
PROTO_OUT := imagegen_service/gen

.DEFAULT_GOAL := help
.PHONY: help install proto run test lint clean bench image

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-9s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP) $(RUN_STAMP)

$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e .
	touch $(RUN_STAMP)

install: $(STAMP) ## Create .venv and install the project with its dev tools

proto: $(STAMP) ## Regenerate the Python code and type stubs from proto/
	rm -rf $(PROTO_OUT) $(VENV)/protoc-out
	mkdir -p $(PROTO_OUT) $(VENV)/protoc-out
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -I proto -I proto/third_party \
		--python_out=$(VENV)/protoc-out --grpc_python_out=$(VENV)/protoc-out \
		--mypy_out=quiet:$(VENV)/protoc-out --mypy_grpc_out=quiet:$(VENV)/protoc-out \
		proto/imagegen/v1/*.proto
	mv $(VENV)/protoc-out/imagegen/v1/* $(PROTO_OUT)/
	sed -i 's/^from imagegen\.v1 import/from imagegen_service.gen import/' $(PROTO_OUT)/*.py $(PROTO_OUT)/*.pyi
	# The .proto files ship in the wheel beside the code made from them.
	mkdir -p $(PROTO_OUT)/proto
	cp -r proto/imagegen proto/third_party/google $(PROTO_OUT)/proto/
	printf '"""Code generated from proto/ by `make proto`; do not edit."""\n' > $(PROTO_OUT)/__init__.py

run: $(RUN_STAMP) ## Start the service and the gateway on 127.0.0.1 (Ctrl-C stops both)
	$(BIN)/imagegen-run

test: $(STAMP) ## Run the test suite
	$(BIN)/pytest -q

lint: $(STAMP) ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP) ## Benchmark the stack with wrk against a bare-aiohttp floor and the design's ceiling (BENCH_DURATION=10)
	$(BIN)/python -m tests.bench

image: $(STAMP) ## Build the Dockerfile with buildah (root; a debootstrapped base if no registry) and print the image
	$(BIN)/python -m tests.test_container_image

clean: ## Remove .venv and the local data directory
	rm -rf $(VENV) var
