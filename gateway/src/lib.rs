//! Nodegate's gateway: the daemon and its CLI (`main.rs` is a thin binary over [`cli::main`]).
//! A library so that benches and fuzz targets reach the modules. See docs/ARCHITECTURE.md.

pub mod admin;
pub mod auth;
pub mod cli;
pub mod config;
pub mod ebpf;
pub mod explain;
pub mod policy;
pub mod proxy;
pub mod source;
pub mod telemetry;
