# Each target sets up what it needs: .venv, the Debian Fashion-MNIST package, the pinned
# Python packages. Run `make demo` or `make test` on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Flower offline: no telemetry, no update check, no per-run dependency reinstall.
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

DEMO_ARGS := --dataset fashion-mnist --partition dirichlet --alpha 0.5 --clients 10 \
             --rounds 5 --local-epochs 1 --model simple-cnn --no-projection --seed 0 --quiet
# The mission's own clients: projected EfficientNet-Lite0 (pretrained kernels frozen) at
# 32 px; 3 of the 10 clients per round and 2 rounds keep it to a few minutes on 2 cores,
# and fusion skips its refinement, as in the headline's EfficientNet slice (minutes a round here).
DEMO_PROJECTED_ARGS := --dataset fashion-mnist --partition dirichlet --alpha 0.5 --clients 10 --fraction 0.3 \
             --rounds 2 --local-epochs 1 --model efficientnet-lite0 --resolution 32 --lr 0.1 --momentum 0 --proxy-size 500 \
             --seed 0 --quiet

.PHONY: setup demo demo-projected test test-slow bench bench-plan bench-one-shot bench-few-round bench-fusion-policy bench-byzantine bench-fusion-then-fedavg bench-fusion-target bench-smoke bench-micro bench-overhead bench-projection bench-fusion gpu-check clean

setup: $(STAMP) $(FMNIST)

$(FMNIST):
	$(SUDO) apt-get update
	$(SUDO) apt-get install -y dataset-fashion-mnist

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[test]"
	touch $(STAMP)

demo: setup
	$(BIN)/fedfuse run --strategy fedavg $(DEMO_ARGS) --out runs/demo/fedavg
	$(BIN)/fedfuse run --strategy fusion $(DEMO_ARGS) --out runs/demo/fusion
	$(BIN)/fedfuse compare runs/demo/fedavg runs/demo/fusion

demo-projected: setup
	@echo "projected EfficientNet-Lite0, 3 of 10 clients per round, 2 rounds: a glimpse, not the headline grid"
	$(BIN)/fedfuse run --strategy fedavg $(DEMO_PROJECTED_ARGS) --out runs/demo-projected/fedavg
	$(BIN)/fedfuse run --strategy fusion --fusion-refine-steps 0 $(DEMO_PROJECTED_ARGS) --out runs/demo-projected/fusion
	$(BIN)/fedfuse compare runs/demo-projected/fedavg runs/demo-projected/fusion

test: setup
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: setup
	$(BIN)/python -m pytest -m slow -q

# On a machine with CUDA: the server's GPU fusion and distillation against the CPU's
# (tests skipped elsewhere), then the projected model's epoch and fusion times, the GPU's
# fusion included (not run yet: no GPU has been lent to this project).
gpu-check: setup
	$(BIN)/python -c "import torch; print('CUDA devices:', torch.cuda.device_count())"
	$(BIN)/python -m pytest -q -rs tests/test_fusion.py::test_fusion_on_the_gpu_matches_the_cpu \
		tests/test_feddf.py::test_distillation_on_the_gpu_matches_the_cpu
	$(BIN)/fedfuse lab projection --repeats 3 --threads 4

# The headline grid (fusion, fusion-uniform, FedAvg, FedProx; 3 splits, 1 and 5 local
# epochs, small CNN and projected EfficientNet-Lite0, 3 seeds): days on 2 cores, most of
# it EfficientNet. Its records are committed in results/fmnist-noniid: the command runs
# what is missing there and rewrites the report (interrupt it at will). BENCH_ONLY picks a
# slice, e.g. make bench BENCH_ONLY='simple-cnn-*'; a grid from scratch:
# fedfuse bench simulations/configs/fmnist-noniid.toml --out runs/mine
BENCH_ONLY ?= *
bench: setup
	$(BIN)/fedfuse bench simulations/configs/fmnist-noniid.toml --out results/fmnist-noniid --only '$(BENCH_ONLY)'

# What is left of the headline grid and how long it should take, from its finished runs.
bench-plan: setup
	$(BIN)/fedfuse bench simulations/configs/fmnist-noniid.toml --out results/fmnist-noniid --only '$(BENCH_ONLY)' --plan

# One-shot federated learning (one round of 20 local epochs, the small CNN, the same
# splits; FedAvg, FedDF and fusion): about 20 minutes per seed here. Records in results/one-shot.
bench-one-shot: setup
	$(BIN)/fedfuse bench simulations/configs/one-shot.toml --out results/one-shot --only '$(BENCH_ONLY)'

# Few-round federated learning (3 rounds of 20 local epochs, the small CNN, the same splits;
# FedAvg, FedProx, FedAvgM, FedDF, fusion and fusion-uniform, 3 seeds, 57 runs): about 8 hours
# here by `--plan`, the skewed splits first. Records in results/few-round.
bench-few-round: setup
	$(BIN)/fedfuse bench simulations/configs/few-round.toml --out results/few-round --only '$(BENCH_ONLY)'

# Ablation: fusion in round 1 only, then FedAvg, on the headline's small-CNN runs
# (about 40 minutes here). Records in results/fusion-then-fedavg.
bench-fusion-then-fedavg: setup
	$(BIN)/fedfuse bench simulations/configs/fusion-then-fedavg.toml --out results/fusion-then-fedavg --only '$(BENCH_ONLY)'

# Fusion meant never to trail FedAvg: clients on FedAvg's trajectory, the fused model out where
# the check prefers it (plain, and refined and blended), on the headline's small-CNN runs (about 3 hours
# here). Records in results/fusion-policy.
bench-fusion-policy: setup
	$(BIN)/fedfuse bench simulations/configs/fusion-policy.toml --out results/fusion-policy --only '$(BENCH_ONLY)'

# Byzantine clients: 2 of 10 attackers, each attack, FedAvg, Krum, FedMedian, FedTrimmedAvg
# and fusion at Dirichlet 0.5 and 0.1, 3 seeds (141 runs: about 5.5 hours here by the headline's
# per-run times, resumable; an attack runs only against the strategies it reaches).
# Records in results/byzantine.
bench-byzantine: setup
	$(BIN)/fedfuse bench simulations/configs/byzantine.toml --out results/byzantine --only '$(BENCH_ONLY)'

# Why multi-round fusion trails FedAvg: per FedAvg round, the average against the
# class-weighted ensemble fusion fits (small CNN, the headline's splits; ~15 minutes here).
bench-fusion-target: setup
	for seed in 0 1 2; do $(BIN)/fedfuse lab fusion-target --alpha 0.1 --seed $$seed --out runs/bench-fusion-target/dir0.1-e1-s$$seed; done
	$(BIN)/fedfuse lab fusion-target --alpha 0.1 --local-epochs 5 --out runs/bench-fusion-target/dir0.1-e5-s0
	$(BIN)/fedfuse lab fusion-target --partition pathological --out runs/bench-fusion-target/C2-e1-s0
	$(BIN)/fedfuse lab fusion-target --partition pathological --local-epochs 5 --out runs/bench-fusion-target/C2-e5-s0
	$(BIN)/fedfuse lab fusion-target --alpha 0.5 --out runs/bench-fusion-target/dir0.5-e1-s0

bench-smoke: setup
	$(BIN)/fedfuse bench simulations/configs/smoke.toml --out runs/bench-smoke

# Figures of speed and of fusion alone (minutes to an hour each).
bench-micro: bench-overhead bench-projection bench-fusion

bench-overhead: setup
	$(BIN)/fedfuse lab overhead --clients 10 --rounds 3 --out runs/bench-overhead

bench-projection: setup
	$(BIN)/fedfuse lab projection --resolution 64 --batch-size 32 --repeats 15

# Fusion: zero-shot against averaging and the ensemble (2 and 4 models), cost by number
# of models, and a 10-round federation against FedAvg at Dirichlet 0.1.
bench-fusion: setup
	$(BIN)/fedfuse lab fusion --models 2
	$(BIN)/fedfuse lab fusion --models 4
	$(BIN)/fedfuse lab fusion-cost
	$(BIN)/fedfuse lab fusion-round --alpha 0.1 --clients 10 --rounds 10 --out runs/bench-fusion-round

clean:
	rm -rf runs .pytest_cache
