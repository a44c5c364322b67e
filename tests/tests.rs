//! End-to-end tests: the real `dsync` binary on real files, as a user runs it.

mod e2e;
