# fashionrec — thin wrappers over the CLI. Every variable is optional:
#   make train DATASET=fashion_mnist N_TRAIN=15000 N_RECO=5000 IMAGE_SIZE=224 EPOCHS=32 \
#              BATCH_SIZE=64 WEIGHTS=imagenet BACKBONE=resnet50 RUN_DIR=runs/default
#   make recommend IDX=5033 K=6
PYTHON     ?= python3
VENV       ?= .venv
DATASET    ?= fashion_mnist
DATA_DIR   ?=
N_TRAIN    ?= 15000
N_RECO     ?= 5000
IMAGE_SIZE ?= 224
EPOCHS     ?= 32
BATCH_SIZE ?= 64
WEIGHTS    ?= imagenet
BACKBONE   ?= resnet50
RUN_DIR    ?= runs/default
IDX        ?= 5033
K          ?= 6
N_HELDOUT  ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.fashionrec-installed

.PHONY: install train recommend evaluate plot test lint bench experiments clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

train: $(STAMP)
	$(BIN)/fashionrec train --dataset $(DATASET) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) \
	  --n-train $(N_TRAIN) --n-reco $(N_RECO) --image-size $(IMAGE_SIZE) --epochs $(EPOCHS) \
	  --batch-size $(BATCH_SIZE) --weights $(WEIGHTS) --backbone $(BACKBONE) --run-dir $(RUN_DIR)

recommend: $(STAMP)
	$(BIN)/fashionrec recommend --run-dir $(RUN_DIR) --idx $(IDX) --k $(K)

evaluate: $(STAMP)
	$(BIN)/fashionrec evaluate --run-dir $(RUN_DIR) $(if $(N_HELDOUT),--n-heldout $(N_HELDOUT))

plot: $(STAMP)
	$(BIN)/fashionrec plot --run-dir $(RUN_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python experiments/bench_extract.py --sizes 32,64,112,224
	$(BIN)/python experiments/bench_query.py

experiments: $(STAMP)
	$(BIN)/python experiments/features.py --size 224
	$(BIN)/python experiments/quality.py all

clean:
	rm -rf $(RUN_DIR) .pytest_cache
