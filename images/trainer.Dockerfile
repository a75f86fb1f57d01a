# The trainer (every stage Job runs it). Two variants from one file:
#   CPU:  docker build -f images/trainer.Dockerfile -t ghcr.io/medmerge/trainer:0.1.0-cpu .
#   CUDA: docker build -f images/trainer.Dockerfile --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#           --build-arg RUNTIME=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 -t ghcr.io/medmerge/trainer:0.1.0 .
# libtorch comes from the torch wheel tch 0.26 expects (2.13.0), exactly as scripts/setup-torch.sh does.
ARG RUNTIME=debian:bookworm-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM rust:1.95-bookworm AS build
ARG TORCH_INDEX
RUN apt-get update && apt-get install -y --no-install-recommends python3-venv fonts-dejavu-core && rm -rf /var/lib/apt/lists/*
# torch from the chosen index first; scripts/setup-torch.sh then keeps it and adds the ImageNet
# EfficientNet-Lite0 weights (converted to safetensors).
ENV MEDMERGE_CACHE=/opt/medmerge
RUN python3 -m venv $MEDMERGE_CACHE/venv && $MEDMERGE_CACHE/venv/bin/pip install --no-cache-dir --index-url "$TORCH_INDEX" torch==2.13.0
WORKDIR /src
COPY . .
RUN bash scripts/setup-torch.sh
RUN . scripts/env.sh && cargo build --release --locked -p medmerge-trainer --bin medmerge-trainer
RUN mkdir -p /out/lib /out/weights /out/bin \
    && cp -L $MEDMERGE_CACHE/venv/lib/python3*/site-packages/torch/lib/*.so* /out/lib/ \
    && cp $MEDMERGE_CACHE/weights/efficientnet-lite0-imagenet.safetensors /out/weights/ \
    && cp $MEDMERGE_CACHE/target/release/medmerge-trainer /out/bin/

FROM ${RUNTIME}
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 ca-certificates fonts-dejavu-core && rm -rf /var/lib/apt/lists/* \
    && (getent passwd 65532 || useradd --uid 65532 --user-group --no-create-home --shell /usr/sbin/nologin medmerge)
COPY --from=build /out/lib /opt/libtorch/lib
COPY --from=build /out/weights /opt/medmerge/weights
COPY --from=build /out/bin/medmerge-trainer /usr/local/bin/medmerge-trainer
ENV LD_LIBRARY_PATH=/opt/libtorch/lib HOME=/tmp MEDMERGE_WEIGHTS=/opt/medmerge/weights/efficientnet-lite0-imagenet.safetensors
# Stage Jobs mount the MergeJob at /etc/medmerge and an emptyDir at /tmp; the root FS is read-only.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/medmerge-trainer"]
