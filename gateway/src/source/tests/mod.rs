//! The Kubernetes source against a stand-in API server (`fakeapi`) over real HTTP, and
//! `daemonset/` against the Rust types.

mod daemonset;
mod fakeapi;
mod kube_source;
