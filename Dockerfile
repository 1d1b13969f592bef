# crdt-node container image: a release build, then a small runtime with no shell.
#   docker build -t crdt-node:0.1.0 .
# Runtime needs, all explicit below: glibc (distroless/cc), CA certificates for wss:// peers
# (in the base image), the config file (CRDT_CONFIG), and a writable data
# directory for the embedded SQLite default (/var/lib/crdt-node; unused with PostgreSQL).
# The pages are compiled into the binary.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so code changes do not rebuild them.
COPY Cargo.toml Cargo.lock ./
# automerge with one fix, used through [patch.crates-io] (vendor/README.md).
COPY vendor vendor
COPY benches benches
COPY crates/run-doc/Cargo.toml crates/run-doc/
COPY crates/run-store/Cargo.toml crates/run-store/
COPY crates/run-wire/Cargo.toml crates/run-wire/
COPY crates/test-support/Cargo.toml crates/test-support/
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && for c in crates/*/; do mkdir -p "$c/src" && touch "$c/src/lib.rs"; done \
 && CARGO_PROFILE_RELEASE_DEBUG=0 cargo build --release --locked --bin crdt-node \
 && rm -rf src crates/*/src
COPY crates crates
COPY src src
COPY migrations migrations
COPY web web
COPY config config
RUN touch src/main.rs src/lib.rs crates/*/src/lib.rs \
 && CARGO_PROFILE_RELEASE_DEBUG=0 cargo build --release --locked --bin crdt-node \
 && mkdir -p /out/data

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/crdt-node /usr/local/bin/crdt-node
COPY config/application.yml /etc/crdt-node/application.yml
COPY --from=build --chown=65532:65532 /out/data /var/lib/crdt-node
ENV CRDT_CONFIG=/etc/crdt-node/application.yml \
    BIND=0.0.0.0 \
    PORT=8080 \
    DATABASE_URL=sqlite:///var/lib/crdt-node/crdt-node.db
USER 65532:65532
EXPOSE 8080
VOLUME ["/var/lib/crdt-node"]
ENTRYPOINT ["/usr/local/bin/crdt-node"]
