//! The builds of the node a benchmark compares: this one, and an earlier one when
//! `CRDT_BENCH_BEFORE` names its binary and `CRDT_BENCH_BEFORE_CONFIG` its configuration.

/// A build of the node to run.
pub struct Build {
    pub name: &'static str,
    pub binary: String,
    pub config: String,
}

/// The earlier build (if named), then this one (`binary` and `config` of the caller's crate).
pub fn builds(binary: &str, config: &str) -> Vec<Build> {
    let mut out = Vec::new();
    if let (Ok(binary), Ok(config)) = (
        std::env::var("CRDT_BENCH_BEFORE"),
        std::env::var("CRDT_BENCH_BEFORE_CONFIG"),
    ) {
        out.push(Build {
            name: "before",
            binary,
            config,
        });
    }
    out.push(Build {
        name: "after",
        binary: binary.into(),
        config: config.into(),
    });
    out
}
