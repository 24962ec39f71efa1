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

LOAD_VENV ?= .venv-load
LOAD_USERS ?= 16
LOAD_TIME ?= 2m
P95_BOUND_MS ?= 60000

.PHONY: setup load-setup repository serve demo test soak bench perf-sweep load clean

setup: $(VENV)/.setup-done load-setup

$(VENV)/.setup-done: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[build,server,test,perf]'
	@# perf_analyzer (shipped in tritonclient) needs libb64.so.0d from Debian's libb64-0d.
	@ldconfig -p | grep -q libb64.so.0d || { echo "installing libb64-0d for perf_analyzer"; \
	  (apt-get update -qq && apt-get install -y -qq libb64-0d) >/dev/null || \
	  echo "WARNING: could not install libb64-0d (apt-get install libb64-0d): perf_analyzer will not start"; }
	@# The Kubernetes tests render docker/k8s with `kubectl kustomize`.
	@command -v kubectl >/dev/null || { echo "installing kubernetes-client (kubectl) for the manifest tests"; \
	  (apt-get update -qq && apt-get install -y -qq kubernetes-client) >/dev/null || \
	  echo "WARNING: no kubectl (apt-get install kubernetes-client): tests/test_k8s.py will fail"; }
	touch $@

# The load generator's own venv: locust cannot share one with tritonclient[http] 2.51.
load-setup: $(LOAD_VENV)/.setup-done

$(LOAD_VENV)/.setup-done: perf/requirements-load.txt
	$(PYTHON) -m venv $(LOAD_VENV)
	$(LOAD_VENV)/bin/pip install --quiet --upgrade pip
	$(LOAD_VENV)/bin/pip install --quiet -r perf/requirements-load.txt
	touch $@

# Builds $(REPO_DIR) with the variants in $(MODEL) (space-separated: several
# side by side, the first answers as `sam`) from $(SAM_CHECKPOINT) (a path or
# URL for a single model; `official` downloads and verifies the official
# checkpoints), or from random weights when none is given; rebuilt when the
# models, the weights source or the project's code change.
repository: setup
	@code=$$(find samtriton model_repository -name '*.py' -o -name '*.pbtxt' | LC_ALL=C sort | xargs cat | sha256sum | cut -c1-16); \
	source="$${SAM_CHECKPOINT:-random} code=$$code"; \
	if [ "$$(cat $(REPO_DIR)/.built-from 2>/dev/null)" != "$(MODEL) $$source" ]; then \
	  if [ -z "$(SAM_CHECKPOINT)" ]; then \
	    echo "==================================================================="; \
	    echo " No checkpoint given: building $(MODEL) with RANDOM WEIGHTS."; \
	    echo " The masks will be meaningless. For real masks, download the"; \
	    echo " official checkpoint and run:  make serve SAM_CHECKPOINT=/path/mobile_sam.pt"; \
	    echo " (or SAM_CHECKPOINT=official to download and verify it)"; \
	    echo "==================================================================="; \
	    weights="--random-weights"; \
	  elif [ "$(SAM_CHECKPOINT)" = official ]; then weights=""; \
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

# The soak test of `make test` (60 s at saturation) for SOAK_SECONDS, with its
# failure, memory-growth and /dev/shm checks; prints the figures.
SOAK_SECONDS ?= 900
SOAK_MAX_RSS_GROWTH_MB ?= 300
soak: setup
	SAMTRITON_SOAK_SECONDS=$(SOAK_SECONDS) SAMTRITON_SOAK_MAX_RSS_GROWTH_MB=$(SOAK_MAX_RSS_GROWTH_MB) \
	  $(VENV)/bin/pytest -s --timeout=$$(( $(SOAK_SECONDS) + 900 )) tests/test_reliability.py -k soak

# Batched vs one-by-one, serving overhead, where the time goes, what a click costs,
# segment everything (about 8 minutes on 2 CPU cores); then the CPU report per
# variant of BENCH_MODELS: runtimes x precisions with the accuracy gate, the
# cache-hit ratios, served vs in-process, build peak memory (about 25 minutes).
BENCH_MODELS ?= mobilesam efficientvit-sam-l0 sam-vit-b
BENCH_REPO ?= var/bench_repository
bench: repository
	$(VENV)/bin/python perf/batched_vs_sequential.py --model-repository $(REPO_DIR)
	$(VENV)/bin/python perf/serving_overhead.py --model-repository $(REPO_DIR)
	$(VENV)/bin/python perf/breakdown.py --model-repository $(REPO_DIR)
	$(VENV)/bin/python perf/clicks.py --model-repository $(REPO_DIR)
	$(VENV)/bin/python perf/everything.py --model-repository $(REPO_DIR)
	$(SAMTRITON) build --model $(BENCH_MODELS) --random-weights --out $(BENCH_REPO)
	$(VENV)/bin/python perf/cpu_runtimes.py --model-repository $(BENCH_REPO)
	for m in $(BENCH_MODELS); do $(VENV)/bin/python perf/cache_ratio.py --model-repository $(BENCH_REPO) --model $$m; done
	for m in $(BENCH_MODELS); do $(VENV)/bin/python perf/serving_overhead.py --model-repository $(BENCH_REPO) --model $$m; done
	$(VENV)/bin/python perf/build_memory.py --model $(BENCH_MODELS)

# perf_analyzer over gRPC and HTTP, concurrency 1..32 and request rates.
perf-sweep: repository
	$(VENV)/bin/python perf/sweep.py --model-repository $(REPO_DIR) --request-rates 0.25,0.5,1

# locust, headless, against a server started for the run.
load: repository load-setup
	$(VENV)/bin/python perf/run_load.py --model-repository $(REPO_DIR) --locust $(LOAD_VENV)/bin/locust \
	  --users $(LOAD_USERS) --run-time $(LOAD_TIME) --p95-bound-ms $(P95_BOUND_MS)

clean:
	rm -rf var .pytest_cache
