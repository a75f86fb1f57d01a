# The operator: a static-ish Rust binary on a distroless base, non-root, no shell.
# Build from the repository root: docker build -f images/operator.Dockerfile -t ghcr.io/medmerge/operator:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The operator does not link libtorch; only its own crate and the crds are compiled.
RUN CARGO_TARGET_DIR=/src/target cargo build --release --locked -p medmerge-operator --bin medmerge-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/medmerge-operator /usr/local/bin/medmerge-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/medmerge-operator"]
