# `make test` and `make demo` each set up their own virtual environment from a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build from local disk; a bare `torch` requirement could pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# The embedded default: synthesize the shapes domain, train the tiny MoE on CPU (tiny preset), merge its last
# checkpoints (WSM), sample the held-out prompts (96+ per task, small tasks' prompts repeated: ~390 images per task,
# so each task's 95% interval is at most +-0.05) and print the compositional score per task with its interval and
# the phase table. Writes $(DEMO)/ (replaced on each run): data/, run/ (samples/*.png, loss_curve.png,
# tensorboard/, timing.json), merged/, eval/ (report.json, detections.png, timing.json), phases.jsonl.
# Time guard: the whole demo must fit DEMO_BUDGET seconds after setup (15 min minus ~100 s of setup). Training
# gets what is left after the data and a reserve for merging and scoring; the trainer times its first steps,
# fits its step count to that and prints the plan, so a slower or busier machine trains fewer steps, not longer.
DEMO ?= runs/demo
DEMO_BUDGET ?= 780
DEMO_EVAL_RESERVE ?= 250
NUCLEUS := $(VENV)/bin/nucleus
# Phase table: each command's wall time goes to $(DEMO)/phases.jsonl ("setup" counts from make's start, so it
# includes building the virtual environment when this make built it); training and scoring add their inner phases.
MAKE_START_NS := $(shell date +%s%N)
TIMING := $(PY) -m nucleus_image.timing
demo: $(STAMP)
	@rm -rf $(DEMO); mkdir -p $(DEMO); start=$$(date +%s); \
	$(TIMING) record $(DEMO) setup $(MAKE_START_NS) && t=$$(date +%s%N) && \
	$(NUCLEUS) data synth --out $(DEMO)/data --num 4000 --seed 0 --size 64 --aspects 1:1,4:3,3:4 \
		--heldout-per-task 96 --heldout-repeat && \
	$(TIMING) record $(DEMO) synthesis $$t && \
	budget=$$(( $(DEMO_BUDGET) - $(DEMO_EVAL_RESERVE) - ($$(date +%s) - start) )) && \
	budget=$$(( budget > 60 ? budget : 60 )) && \
	echo "demo: $$(( $$(date +%s) - start )) s used; training gets $$budget s (the trainer fits its steps to it)" && \
	t=$$(date +%s%N) && \
	$(NUCLEUS) train --preset tiny --data $(DEMO)/data --out $(DEMO)/run --set time_budget_s=$$budget && \
	$(TIMING) record $(DEMO) training $$t && t=$$(date +%s%N) && \
	$(NUCLEUS) merge $(DEMO)/run --out $(DEMO)/merged && \
	$(TIMING) record $(DEMO) merge $$t && t=$$(date +%s%N) && \
	$(NUCLEUS) eval compositional --model $(DEMO)/merged --prompts $(DEMO)/data/heldout_metadata.jsonl \
		--out $(DEMO)/eval --samples 4 --steps 16 --batch-size 48 && \
	$(TIMING) record $(DEMO) "sampling and scoring" $$t && \
	$(TIMING) table $(DEMO) && \
	echo "demo: $$(( $$(date +%s) - start )) s from data to scores (setup excluded); results in $(DEMO)/"

clean:
	rm -rf $(VENV) runs
