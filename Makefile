# The two commands of the README: `make demo` and `make test`. Both set everything up themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Installed first and explicitly, so the package's lower bounds never pull a newer multi-GB build.
TORCH := torch==2.14.1 torchvision==0.29.1
FMNIST_DEB := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
FAIRTUNE := $(BIN)/fairtune
# The offline main job at CPU scale: five representative searches, their final reruns and the tables,
# as one `fairtune protocol` (one Ray session, the work packed onto every core). The same command with
# default sizes (no --train-size/--eval-size, 50 epochs, 16 samples, seeds 0-3) and every method is the
# full protocol, meant for a GPU cluster. `make demo DEMO_RESULTS=results` regenerates
# the committed reference in results/fmnist-s/.
DEMO_RESULTS ?= results/demo
DEMO_METHODS := scratch hkd ss ad mfd
DEMO_DATA := --dataset fmnist-s --train-size 3000 --eval-size 1000 --results-dir $(DEMO_RESULTS)
DEMO_SEARCH := --max-epochs 4 --num-samples 3 --grace-period 1
DEMO_SEEDS := 0 1

.PHONY: install data test demo bench bundle clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

# Fashion-MNIST (for fmnist-s) comes from Debian's dataset-fashion-mnist package.
data:
	@if [ -f $(FMNIST_DEB) ] || [ -f data/fashion-mnist/train-images-idx3-ubyte.gz ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist', or put the four IDX .gz files in data/fashion-mnist/"; \
		exit 1; \
	fi

test: install data
	$(BIN)/python -m pytest -q

demo: install data
	$(FAIRTUNE) list
	rm -rf $(DEMO_RESULTS)/fmnist-s
	$(FAIRTUNE) protocol --method $(DEMO_METHODS) $(DEMO_DATA) $(DEMO_SEARCH) --seeds $(DEMO_SEEDS)

bench: install data
	@ls benchmarks/*.py >/dev/null 2>&1 || { echo "no benchmarks yet"; exit 0; }
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

# The wheels the GPU check installs on the registry-less GPU machine (README: GPU check); ~49 MB in .bundle/.
bundle:
	PYTHON=$(PYTHON) bash benchmarks/gpu/make-bundle.sh .bundle

clean:
	rm -rf $(VENV) .pytest_cache
