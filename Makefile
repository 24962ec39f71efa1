# samtriton: the two commands a newcomer runs are `make serve` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
MODEL ?= mobilesam
REPO_DIR ?= var/model_repository
SAM_CHECKPOINT ?=
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
PYTEST_ARGS ?=

SAMTRITON := $(VENV)/bin/samtriton

.PHONY: setup repository serve demo test clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[build,server,test]'
	touch $@

# Builds $(REPO_DIR) from $(SAM_CHECKPOINT), or from random weights when none is
# given; rebuilt when the weights source or the project's code changes.
repository: setup
	@code=$$(find samtriton model_repository -name '*.py' -o -name '*.pbtxt' | LC_ALL=C sort | xargs cat | sha256sum | cut -c1-16); \
	source="$${SAM_CHECKPOINT:-random} code=$$code"; \
	if [ "$$(cat $(REPO_DIR)/.built-from 2>/dev/null)" != "$(MODEL) $$source" ]; then \
	  if [ -z "$(SAM_CHECKPOINT)" ]; then \
	    echo "==================================================================="; \
	    echo " No checkpoint given: building $(MODEL) with RANDOM WEIGHTS."; \
	    echo " The masks will be meaningless. For real masks, download the"; \
	    echo " official checkpoint and run:  make serve SAM_CHECKPOINT=/path/mobile_sam.pt"; \
	    echo "==================================================================="; \
	    weights="--random-weights"; \
	  else weights="--checkpoint $(SAM_CHECKPOINT)"; fi; \
	  rm -rf $(REPO_DIR) && \
	  $(SAMTRITON) build --model $(MODEL) $$weights --out $(REPO_DIR) && \
	  echo "$(MODEL) $$source" > $(REPO_DIR)/.built-from; \
	else echo "$(REPO_DIR) is up to date ($(MODEL), weights: $$source)"; fi

serve: repository
	$(SAMTRITON) serve --model-repository $(REPO_DIR) \
	  --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

demo: repository
	$(SAMTRITON) demo --model-repository $(REPO_DIR) --overlay var/demo_overlay.png

test: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

clean:
	rm -rf var .pytest_cache
