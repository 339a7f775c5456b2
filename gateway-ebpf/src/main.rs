//! Nodegate kernel programs, one file per hook:
//!
//! - [`connect`]: `cgroup/connect4` + `cgroup/connect6` redirect connects to protected
//!   destinations to the gateway's proxy and record the original destination;
//! - [`sockops`]: `sock_ops` re-keys that record by the client's address once the
//!   connection is established, so that the proxy finds it by the peer address of `accept()`;
//! - [`ingress`]: `cgroup_skb/ingress` drops (or, in audit mode, passes) and counts packets
//!   that reach a protected endpoint without coming from a gateway.
//!
//! Every map is pinned by name, so state and counters outlive the daemon.
#![no_std]
#![no_main]
// The program macros take the context by value; `try_*` return `Result` even where every
// path succeeds, so that each hook reads the same; helpers are inlined on purpose (a
// BPF-to-BPF call costs a frame and splits the verifier's state).
#![allow(
    clippy::needless_pass_by_value,
    clippy::unnecessary_wraps,
    clippy::inline_always,
    reason = "eBPF program conventions, see the comment above"
)]

mod connect;
mod ingress;
mod maps;
mod sockops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
