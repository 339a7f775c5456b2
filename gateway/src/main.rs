//! `gateway`: the Nodegate daemon and its CLI. See docs/ARCHITECTURE.md.

fn main() -> std::process::ExitCode {
    gateway::cli::main()
}
