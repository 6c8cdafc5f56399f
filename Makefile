# cxr-lightning: every target sets itself up; `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo demo-heads test lint sweep tensorboard bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first, pinned to the builds this project is tested with; any torch>=2.2 works elsewhere.
	$(PY) -m pip install "torch==2.14.1" "torchvision==0.29.1" || $(PY) -m pip install torch torchvision
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The seed's fusion model on the demo dataset (generated on first use), then evaluated and
# explained; ends with the path of the run's report.html.
demo: $(STAMP)
	@set -e; run=outputs/demo/$$(date +%Y-%m-%d_%H-%M-%S); \
	$(PY) -m cxr_lightning.train experiment=demo hydra.run.dir=$$run; \
	$(PY) -m cxr_lightning.evaluate run_dir=$$run; \
	$(PY) -m cxr_lightning.explain run_dir=$$run split=test n=16; \
	$(PY) -m cxr_lightning.summary $$run

# Benchmark (not a test): the four heads, with and without prior-visit labels, at make demo's
# budget; the sweep's comparison.{md,html} lands in outputs/demo-heads/<time>/.
demo-heads: $(STAMP)
	$(PY) -m cxr_lightning.train -m experiment=demo head=baseline,metadata_only,fusion,fusion_residual \
	  data.prior_labels=true,false hydra.sweep.dir=outputs/demo-heads/$$(date +%Y-%m-%d_%H-%M-%S) \
	  'hydra.callbacks.compare.by=[head,data.prior_labels]' callbacks.progress_bar=null $(ARGS)

test: $(STAMP)
	$(PY) -m pytest

# ruff, configured in pyproject.toml: pycodestyle, pyflakes, import order, bugbear.
lint: $(STAMP)
	$(VENV)/bin/ruff check .

sweep: $(STAMP)
	$(PY) -m cxr_lightning.train -m experiment=backbone_comparison_demo $(ARGS)

tensorboard: $(STAMP)
	$(VENV)/bin/tensorboard --logdir outputs --bind_all

# Extra Hydra overrides for bench and sweep, e.g. make bench ARGS='bench.backbones=[resnet50]'
ARGS ?=

bench: $(STAMP)
	$(PY) -m cxr_lightning.bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
