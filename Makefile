# The two first commands on a fresh machine are `make demo` and `make test`; both create or update .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# exllamav2 and the pipeline run on a CUDA torch where there is a GPU; elsewhere the CPU build on disk is used.
TORCH_SPEC := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: install demo bench test quality style clean
.PRECIOUS: quant-% upload-%

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]" "$(TORCH_SPEC)"
	touch $(STAMP)

# The default recipe end to end: build the model, measure, quantize to 3.0/4.0/5.0 bpw, evaluate, report.
demo: $(STAMP)
	$(BIN)/exl2 model build-default
	$(BIN)/exl2 inspect "$$($(BIN)/exl2 model path)"
	$(BIN)/exl2 run recipes/default.yaml

# One target of a recipe: `make quant-4.0`, `make quant-6.0 RECIPE=recipes/pixtral-12b.yaml`. The measurement is
# made once and shared, so each further target costs its quantize pass and its evaluation only; the report keeps
# every quant of the work dir. `make upload-4.0` publishes that quant (the recipe's upload.repo, gates first).
RECIPE ?= recipes/default.yaml

quant-%: $(STAMP)
	$(BIN)/exl2 run $(RECIPE) --bpw $*

upload-%: $(STAMP)
	$(BIN)/exl2 run $(RECIPE) --bpw $* --only upload

bench: $(STAMP)
	$(BIN)/python -m pipeline.bench

test: $(STAMP)
	$(BIN)/python -m pytest -q

quality: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy quantize calibration eval pipeline

style: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
