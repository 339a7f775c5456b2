//! The Kubernetes source against the stand-in API server (crate `kube-standin`) over real HTTP,
//! and `daemonset/` against the Rust types.

mod daemonset;
mod kube_source;
