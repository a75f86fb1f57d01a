# medmerge. Everything heavy (torch venv, weights, cargo target dir) is cached in
# $(HOME)/.cache/medmerge, so a second run is fast.
SHELL := /bin/bash
ENV := source scripts/env.sh &&

.PHONY: setup build demo test e2e-operator e2e-cluster images test-s3 test-report crds bench-paper bench bench-node

setup:
	bash scripts/setup-torch.sh

build: setup
	$(ENV) cargo build --workspace --bins

## Run a MergeJob end to end on one machine (DATA=<ImageFolder> for real images).
demo: build
	DATA="$(DATA)" bash scripts/demo.sh

## Run every test.
test: setup
	bash scripts/test.sh

## The operator against a real etcd + kube-apiserver (built once, cached; part of `make test`).
e2e-operator:
	bash scripts/with-apiserver.sh bash scripts/e2e-operator.sh

## The artifact store and pipeline against a real S3 server (part of `make test`).
test-s3:
	bash scripts/test-s3.sh

## The HTML report in headless chromium (part of `make test`).
test-report:
	$(ENV) MEDMERGE_CHROMIUM="$$(bash scripts/setup-chromium.sh)" cargo test --workspace --test report_browser -- --ignored

## MergeJobs on a real single-node Kubernetes (kubelet + containerd): the operator installed with
## helm and every stage in pods from the project's images, S3 on the node's bridge.
e2e-cluster:
	bash scripts/with-node.sh bash scripts/with-s3.sh bash scripts/e2e-cluster.sh

## A MergeJob on the real node: apply -> Succeeded, pod start latency, operator RSS.
bench-node: build
	bash bench/node-e2e.sh

## The operator and trainer images (docker-archive tarballs in ~/.cache/medmerge/images).
images: build
	bash scripts/build-images.sh

## Regenerate crds/mergejob.yaml (and the chart's copy) from the Rust types.
crds:
	$(ENV) cargo run -q -p medmerge-crds --bin crdgen > crds/mergejob.yaml
	cp crds/mergejob.yaml charts/medmerge/crds/mergejob.yaml

## Every restoration against the baselines and a control on ../shared/data/eye-fundus (DATA=...),
## IID, Dirichlet, size-skewed and imbalanced hospitals over seeds (IMAGE_SIZE, EPOCHS, SEEDS,
## SPLITS); resumes from its cache. About 90 minutes alone on 2 cores at the defaults.
bench-paper: build
	DATA="$(DATA)" bash bench/paper-table.sh

## Every benchmark, side by side with its alternative; rewrites bench/results/*.md. Training
## throughput vs PyTorch, merge scale (ResNet50 and a 1 GB model) vs a load-everything PyTorch
## merge and mergekit, operator scale against a real kube-apiserver, Grad-CAM on real photographs
## (runs the paper's MergeJob first if needed). About an hour; ~25 GB of scratch disk at its peak.
bench: build
	bash bench/train-throughput.sh
	bash bench/allocator.sh
	bash bench/merge-scale.sh
	SYNTHETIC_GB=1 bash bench/merge-scale.sh
	bash bench/operator-scale.sh
	bash bench/clinical-report.sh

