//! [`NbdConfig`]: how an NBD disk is opened and how it behaves when the server is slow or
//! gone, with its limits and their validation.

use super::NbdError;
use std::time::Duration;

/// How an NBD disk is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdConfig {
    /// Refuse writes even where the export allows them.
    pub read_only: bool,
    /// Connections to open when the server advertises multi-conn (one otherwise: without
    /// multi-conn a flush on one connection need not cover writes made on another).
    pub connections: usize,
    /// Requests in flight per connection; a request beyond waits for a slot.
    pub inflight_max: usize,
    /// How long a request may wait for its reply (slot wait and reconnect wait included);
    /// beyond it the request fails with ETIMEDOUT and its connection is dropped, since a
    /// server that does not answer one request in time is taken as hung.
    pub request_timeout: Duration,
    /// How long connecting and the handshake may take, at open and at each reconnect.
    pub connect_timeout: Duration,
    /// QEMU's `reconnect-delay`: after a connection dies, requests wait up to this long for a
    /// new one (the driver reconnects in the background). Zero, QEMU's default, fails them at
    /// once; the driver still reconnects for later requests. Requests that were in flight
    /// on the dead connection always fail: a write is never silently sent twice.
    pub reconnect_delay: Duration,
    /// Ask for extended headers (64-bit lengths) and structured replies; off only to test
    /// the older paths against servers that offer them.
    pub extended_headers: bool,
    pub structured_replies: bool,
}

/// The most connections `connections` may ask for.
pub const CONNECTIONS_MAX: usize = 16;
/// The most requests in flight per connection (cookies are slot numbers below this).
pub const INFLIGHT_MAX: usize = 1024;

impl Default for NbdConfig {
    fn default() -> NbdConfig {
        // 30 s like the rbd driver's deadline: longer than a healthy server's pauses, short
        // enough that a job's error policy sees a dead one. 128 in flight: far above any
        // queue depth one connection pays for.
        NbdConfig {
            read_only: false,
            connections: 1,
            inflight_max: 128,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            reconnect_delay: Duration::ZERO,
            extended_headers: true,
            structured_replies: true,
        }
    }
}

impl NbdConfig {
    pub fn validate(&self) -> Result<(), NbdError> {
        let bad = |key, value: String, reason| Err(NbdError::Config { key, value, reason });
        if !(1..=CONNECTIONS_MAX).contains(&self.connections) {
            return bad("connections", self.connections.to_string(), "must be 1 to 16");
        }
        if !(1..=INFLIGHT_MAX).contains(&self.inflight_max) {
            return bad("inflight_max", self.inflight_max.to_string(), "must be 1 to 1024");
        }
        if self.request_timeout < Duration::from_millis(10) {
            return bad("request_timeout", format!("{:?}", self.request_timeout), "must be at least 10 ms");
        }
        if self.connect_timeout < Duration::from_millis(10) {
            return bad("connect_timeout", format!("{:?}", self.connect_timeout), "must be at least 10 ms");
        }
        if self.reconnect_delay > Duration::from_secs(3600) {
            return bad("reconnect_delay", format!("{:?}", self.reconnect_delay), "must be at most an hour");
        }
        if self.extended_headers && !self.structured_replies {
            return bad("structured_replies", "false".into(), "extended headers imply structured replies");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        NbdConfig::default().validate().unwrap();
        let zero = NbdConfig { connections: 0, ..NbdConfig::default() };
        assert!(zero.validate().unwrap_err().to_string().contains("connections=0"));
        let many = NbdConfig { inflight_max: 5000, ..NbdConfig::default() };
        assert!(many.validate().unwrap_err().to_string().contains("inflight_max=5000"));
        let short = NbdConfig { request_timeout: Duration::ZERO, ..NbdConfig::default() };
        assert!(short.validate().unwrap_err().to_string().contains("request_timeout"));
    }
}
