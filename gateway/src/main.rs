//! `gateway`: the Nodegate daemon and its CLI. See docs/ARCHITECTURE.md.

/// jemalloc: cheaper small allocations on the request path than glibc's (gateway/Cargo.toml).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    gateway::cli::main()
}
