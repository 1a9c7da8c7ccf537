# fashionrec — thin wrappers over the CLI. Every variable is optional:
#   make train DATASET=fashion_mnist N_TRAIN=15000 N_RECO=5000 IMAGE_SIZE=224 EPOCHS=32 \
#              BATCH_SIZE=64 WEIGHTS=imagenet BACKBONE=resnet50 SEARCH=auto RUN_DIR=runs/default \
#              ENGINE=auto PRECISION=auto   # keras|openvino, float32|bfloat16
#   make index SEARCH=hnsw     # search a trained run with a FAISS HNSW graph
#   make compact               # fold added/removed products into the base index
#   make recommend IDX=5033 K=6
#   make serve RUN_DIR=runs/default HOST=127.0.0.1 PORT=8000   # the service and its page
#   make demo-catalog          # your-own-products walk-through on a generated catalog
#   make demo-real             # real photos: train, evaluate held-out test/, grids
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
SEARCH     ?= auto
ENGINE     ?= auto
PRECISION  ?= auto
RUN_DIR    ?= runs/default
IDX        ?= 5033
K          ?= 6
HOST       ?= 127.0.0.1
PORT       ?= 8000
WORKERS    ?= 1
N_HELDOUT  ?=
PYTEST_ARGS ?=
TEST_WORKERS ?= 2
DEMO_DIR   ?= data/demo-catalog
DEMO_RUN   ?= runs/demo-catalog
DEMO_SIZE  ?= 112
DEMO_EPOCHS ?= 20
# the generated shop keeps the plain recipe (one view, Adam 4e-4): two minutes, not eight
DEMO_RECIPE = --epochs $(DEMO_EPOCHS) --learning-rate 4e-4 --image-fit pad --no-flip
REAL_DIR   ?= ../shared/datasets/clothing-dataset-small
REAL_RUN   ?= runs/demo-real
REAL_SIZE  ?= 224
# the final fit: settings were chosen on validation/, so the head now learns from
# train/ and validation/ (test/ still never trains it); REAL_TRAIN_ON=train keeps the
# validation curve
REAL_TRAIN_ON ?= train+validation
# a few test/ photos (never seen in training) whose recommendations are drawn
REAL_ITEMS ?= test/dress/06a00c0f-5f9a-410d-a7da-3881a9df3a71.jpg \
              test/shoes/07d88b75-85a4-407b-aa73-12294a2ff9a8.jpg \
              test/pants/01033304-f9a4-48c4-af65-677512880fae.jpg \
              test/outwear/0028956e-9962-46f0-ad45-2c42f8a59d94.jpg

# extras installed by `make install`: add gpu for an NVIDIA GPU (EXTRAS=dev,ann,serve,gpu,...)
EXTRAS     ?= dev,ann,serve,openvino,ray,milvus
BIN := $(VENV)/bin
STAMP := $(VENV)/.fashionrec-installed

.PHONY: install train index compact serve recommend evaluate plot test lint bench experiments demo-catalog demo-real clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# TensorFlow is now the `tensorflow` wheel (CPU, and GPU with the gpu extra); an older
	# venv's tensorflow-cpu shares its files, so it goes first
	! $(BIN)/python -m pip show -q tensorflow-cpu 2>/dev/null || \
	  $(BIN)/python -m pip uninstall -y -q tensorflow-cpu
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

train: $(STAMP)
	$(BIN)/fashionrec train --dataset $(DATASET) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) \
	  --n-train $(N_TRAIN) --n-reco $(N_RECO) --image-size $(IMAGE_SIZE) --epochs $(EPOCHS) \
	  --batch-size $(BATCH_SIZE) --weights $(WEIGHTS) --backbone $(BACKBONE) --search $(SEARCH) \
	  --engine $(ENGINE) --precision $(PRECISION) --run-dir $(RUN_DIR)

# how a trained run is searched (SEARCH=exact|hnsw|auto), without retraining
index: $(STAMP)
	$(BIN)/fashionrec index --run-dir $(RUN_DIR) --search $(SEARCH)

# fold products added and removed since training into a new base index
compact: $(STAMP)
	$(BIN)/fashionrec compact --run-dir $(RUN_DIR)

recommend: $(STAMP)
	$(BIN)/fashionrec recommend --run-dir $(RUN_DIR) --idx $(IDX) --k $(K)

evaluate: $(STAMP)
	$(BIN)/fashionrec evaluate --run-dir $(RUN_DIR) $(if $(N_HELDOUT),--n-heldout $(N_HELDOUT))

# the service: JSON API under /api (docs at /docs), the page at /; Ctrl-C stops it.
# Writes need FASHIONREC_API_KEY (or fashionrec serve --api-key-file FILE).
serve: $(STAMP)
	$(BIN)/fashionrec serve --run-dir $(RUN_DIR) --host $(HOST) --port $(PORT) --workers $(WORKERS)

plot: $(STAMP)
	$(BIN)/fashionrec plot --run-dir $(RUN_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python experiments/bench_extract.py --sizes 112,224
	$(BIN)/python experiments/bench_extract.py memory
	$(BIN)/python experiments/bench_ray.py
	$(BIN)/python experiments/embeddings.py --size 64
	$(BIN)/python experiments/bench_query.py
	$(BIN)/python experiments/bench_update.py
	$(BIN)/python experiments/bench_serve.py
	$(BIN)/python experiments/bench_store.py
	$(BIN)/python experiments/bench_replica.py
	$(BIN)/python experiments/bench_replicas.py

experiments: $(STAMP)
	$(BIN)/python experiments/features.py --size 224
	$(BIN)/python experiments/quality.py all

# A generated shop catalog (from Fashion-MNIST, offline) in both layouts: train on the
# image folder, recommend by item id and for a new photo, add and remove products,
# then train on the CSV layout.
demo-catalog: $(STAMP)
	$(BIN)/python -m fashionrec.demo $(DEMO_DIR) $(if $(DATA_DIR),--data-dir $(DATA_DIR))
	$(BIN)/fashionrec train --catalog $(DEMO_DIR)/folder --label-depth 2 \
	  --image-size $(DEMO_SIZE) $(DEMO_RECIPE) --run-dir $(DEMO_RUN) --no-progress
	$(BIN)/fashionrec recommend --run-dir $(DEMO_RUN) --item Footwear/Boots/acme/boots-0000.jpg
	$(BIN)/fashionrec recommend --run-dir $(DEMO_RUN) --image $(DEMO_DIR)/query-sneaker.png \
	  --category Footwear
	$(BIN)/fashionrec add --run-dir $(DEMO_RUN) --catalog $(DEMO_DIR)/new --no-progress
	$(BIN)/fashionrec recommend --run-dir $(DEMO_RUN) \
	  --item Clothing/Dresses/newbrand/new-dresses-0.jpg --same-class
	$(BIN)/fashionrec remove --run-dir $(DEMO_RUN) Footwear/Boots/acme/boots-0000.jpg
	$(BIN)/fashionrec recommend --run-dir $(DEMO_RUN) --image $(DEMO_DIR)/query-dress.png --json
	$(BIN)/fashionrec train --catalog $(DEMO_DIR)/csv/styles.csv --label-column articleType \
	  --category-columns masterCategory,subCategory,articleType --image-size $(DEMO_SIZE) \
	  $(DEMO_RECIPE) --run-dir $(DEMO_RUN)-csv --no-progress
	$(BIN)/fashionrec recommend --run-dir $(DEMO_RUN)-csv --item 10300 --category Footwear
	$(BIN)/fashionrec recommend --run-dir $(DEMO_RUN)-csv --item 10300 \
	  --where 'gender == "Women" and price < 50 and in_stock == true'
	$(BIN)/fashionrec add --run-dir $(DEMO_RUN)-csv --image $(DEMO_DIR)/query-dress.png \
	  --id 20000 --attr 'productDisplayName=Umbra Dress 20000' --attr gender=Women \
	  --attr price=24.5 --attr in_stock=true --no-progress
	$(BIN)/fashionrec recommend --run-dir $(DEMO_RUN)-csv --item 10300 --where 'price < 25'

# Real photos (clothing-dataset-small from ../shared, offline): train on its split
# folders at 224 px (train/ and validation/ fit the head, test/ is held out), score the
# test/ photos against the whole catalog beside the raw-feature baseline, and draw the
# recommendations of a few test photos.
demo-real: $(STAMP)
	$(BIN)/fashionrec train --catalog $(REAL_DIR) --image-size $(REAL_SIZE) \
	  --train-on $(REAL_TRAIN_ON) --run-dir $(REAL_RUN)
	$(BIN)/fashionrec evaluate --run-dir $(REAL_RUN)
	for item in $(REAL_ITEMS); do \
	  $(BIN)/fashionrec recommend --run-dir $(REAL_RUN) --item $$item || exit 1; done

clean:
	rm -rf $(RUN_DIR) .pytest_cache
