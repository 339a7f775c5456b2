//! Nodegate's end-to-end test support.
//!
//! [`harness`] builds a simulated Kubernetes node out of network namespaces and cgroup v2
//! directories, runs processes inside it (pods, the foreign node, a host-network process, the
//! gateway) and tears everything down on drop. The scenarios in `tests/tests/` and `cargo xtask`
//! (`demo`, `bench`) are built on it. The `ngpeer` binary of this package is the traffic helper
//! the harness runs inside the namespaces.
//!
//! Everything here needs root and a real kernel; nothing is skipped when that is missing: the
//! constructors fail with the reason instead.

pub mod harness;
