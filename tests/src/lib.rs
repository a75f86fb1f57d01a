//! Fixtures of the suites in `tests/tests/`: where the repository and the built binaries are,
//! and how to reach the servers the scripts start.

pub mod fixtures;
