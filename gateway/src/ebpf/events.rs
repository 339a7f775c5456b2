//! The bypass event ring buffer as an async stream of decoded events.

use std::mem::size_of;

use aya::maps::{MapData, RingBuf};
use tokio::io::{Interest, unix::AsyncFd};

use super::{BypassEvent, EbpfError, maps};

/// Async stream of kernel bypass events.
pub struct BypassEvents {
    ring: AsyncFd<RingBuf<MapData>>,
    /// Records too short to be an event (kernel/userspace version mismatch); never expected.
    malformed: u64,
}

impl BypassEvents {
    pub(super) fn new(ring: RingBuf<MapData>) -> Result<Self, EbpfError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(EbpfError::NoRuntime);
        }
        // SAFETY: `RingBuf<MapData>` owns the map's fd and mappings for its whole life and
        // `as_raw_fd` always returns that same fd; the `AsyncFd` owns the `RingBuf`.
        let ring =
            unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(|e| {
                EbpfError::Io {
                    context: "registering the bypass event ring buffer with tokio".into(),
                    source: e.into_parts().1,
                }
            })?;
        Ok(Self { ring, malformed: 0 })
    }

    /// Wait for the next batch of events (never empty unless the stream ended).
    pub async fn next_batch(&mut self) -> Result<Vec<BypassEvent>, EbpfError> {
        loop {
            let mut guard = self
                .ring
                .readable_mut()
                .await
                .map_err(|source| EbpfError::Io {
                    context: "waiting on the bypass event ring buffer".into(),
                    source,
                })?;
            // The kernel wakes the consumer only when it has caught up, so no submission may
            // be lost between draining and waiting again: readiness is cleared first (tokio
            // clears only what it saw before this guard), then everything present is drained.
            guard.clear_ready();
            let ring = guard.get_inner_mut();
            let mut batch = Vec::new();
            let mut malformed = 0u64;
            while let Some(item) = ring.next() {
                match decode(&item) {
                    Some(e) => batch.push(e),
                    None => malformed += 1,
                }
            }
            if malformed > 0 {
                // Only a kernel object and binary of different versions could do this.
                tracing::warn!(
                    malformed,
                    "skipped ring-buffer records too short to be bypass events"
                );
                self.malformed += malformed;
            }
            if !batch.is_empty() {
                return Ok(batch);
            }
        }
    }
}

impl BypassEvents {
    /// Records skipped so far because they were too short to be an event.
    pub fn malformed(&self) -> u64 {
        self.malformed
    }
}

/// Decodes one ring-buffer record; `None` if it is too short.
pub fn decode(bytes: &[u8]) -> Option<BypassEvent> {
    if bytes.len() < size_of::<gateway_common::BypassEvent>() {
        return None;
    }
    // SAFETY: at least `size_of::<BypassEvent>()` readable bytes; `read_unaligned` copes
    // with any alignment and the type is `Pod` (every bit pattern is valid).
    let raw =
        unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<gateway_common::BypassEvent>()) };
    Some(BypassEvent {
        service_id: raw.service_id,
        src: maps::socket_from_addr(&raw.src, raw.src_port),
        dst: maps::socket_from_addr(&raw.dst, raw.dst_port),
        reason: maps::reason_str(raw.reason),
        action: maps::action_str(raw.action),
        ts_ns: raw.ts_ns,
    })
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use gateway_common::{ACTION_DROPPED, ACTION_PASSED, REASON_NOT_FROM_GATEWAY};

    use super::*;

    fn raw_event(src: &str, dst: &str, action: u8) -> Vec<u8> {
        let src: SocketAddr = src.parse().unwrap();
        let dst: SocketAddr = dst.parse().unwrap();
        let e = gateway_common::BypassEvent {
            ts_ns: 42,
            service_id: 7,
            reason: REASON_NOT_FROM_GATEWAY,
            action,
            _pad: 0,
            src: maps::addr_from_ip(src.ip()),
            dst: maps::addr_from_ip(dst.ip()),
            src_port: src.port(),
            dst_port: dst.port(),
            ifindex: 3,
        };
        // SAFETY: plain `#[repr(C)]` value without padding viewed as bytes.
        unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(&e).cast::<u8>(), size_of_val(&e))
                .to_vec()
        }
    }

    #[test]
    fn decodes_v4_and_v6_events() {
        let e = decode(&raw_event(
            "10.1.250.2:50122",
            "10.1.2.2:8080",
            ACTION_DROPPED,
        ))
        .unwrap();
        assert_eq!(e.src, "10.1.250.2:50122".parse::<SocketAddr>().unwrap());
        assert_eq!(e.dst, "10.1.2.2:8080".parse::<SocketAddr>().unwrap());
        assert_eq!(
            (e.service_id, e.reason, e.action, e.ts_ns),
            (7, "not_from_gateway", "dropped", 42)
        );

        let e = decode(&raw_event(
            "[fd00::250:2]:1",
            "[fd00::2:2]:8080",
            ACTION_PASSED,
        ))
        .unwrap();
        assert_eq!(e.src, "[fd00::250:2]:1".parse::<SocketAddr>().unwrap());
        assert_eq!(e.action, "passed");
    }

    #[test]
    fn short_and_unaligned_records_never_panic() {
        let bytes = raw_event("10.0.0.1:1", "10.0.0.2:2", ACTION_DROPPED);
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_none(), "len {len}");
        }
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&bytes);
        assert!(decode(&shifted[1..]).is_some());
        // Longer records (a future version appending fields) still decode.
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[0; 8]);
        assert_eq!(decode(&longer), decode(&bytes));
    }
}
