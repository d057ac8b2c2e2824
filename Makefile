# ladle — two commands on a fresh machine: `make serve` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
TORCH  := torch==2.13.0

.PHONY: install serve test lint demo bench clean browser kernels

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# torch first and pinned: the CPU wheel here (a CUDA build of the same version from PyPI on a GPU box)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[all,dev]'
	@touch $(STAMP)

# the KServe v2 gRPC stubs: build output (gitignored), compiled from the protos by grpcio-tools
GRPC_OUT := src/ladle/api/grpc/generated/grpc_service_pb2_grpc.py
$(GRPC_OUT): $(STAMP) $(wildcard src/ladle/api/grpc/protos/*.proto)
	$(PY) -m ladle.api.grpc.build

install: $(STAMP) $(GRPC_OUT) demo browser kernels

# the LLM kernels and torch operators, compiled for this CPU and cached (~15 s once; then instant)
kernels: $(STAMP)
	@$(PY) -m ladle.llm.kernels

# Debian's chromium for the console's browser tests (Playwright drives it; nothing is downloaded by Playwright)
browser:
	@bash scripts/install-chromium.sh

demo: $(STAMP)
	$(PY) examples/build_demo.py

serve: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/ladle serve examples/models --host 127.0.0.1 --port 8000 --allow-admin-without-key

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: install lint
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q --durations=25

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
