//! The benchmarks' command line: section names to run (all when none) and `--` flags.

pub struct Args(Vec<String>);

impl Args {
    /// From the process arguments, without the `--bench` cargo adds.
    pub fn from_env() -> Args {
        Args(
            std::env::args()
                .skip(1)
                .filter(|a| !a.starts_with("--bench"))
                .collect(),
        )
    }

    /// Whether section `name` runs: named, or no section named at all.
    pub fn wants(&self, name: &str) -> bool {
        let mut named = self.0.iter().filter(|a| !a.starts_with("--")).peekable();
        named.peek().is_none() || named.any(|a| a == name)
    }

    pub fn flag(&self, flag: &str) -> bool {
        self.0.iter().any(|a| a == flag)
    }
}
