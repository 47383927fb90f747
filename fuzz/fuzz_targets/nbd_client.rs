//! The NBD client's parsing of what a server says. The first byte picks the phase: even, the
//! handshake (the sans-I/O negotiation over the rest as the server's bytes: greeting, option
//! replies, the EXPORT_NAME answer), asking for extended headers (bit 1) and structured
//! replies (bit 2); odd, the transmission phase in the header style `(byte >> 1) % 3`
//! (simple, structured, extended), the rest as replies to a read, a status request, a flush,
//! a write and a read at the disk's far end (cookies 1 to 5), through the reader's rules.
//! Invariant: no input panics; accepted read data lands inside its buffer, and a request
//! finished Ok is whole (a read covered, a status with its extent).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_drivers::nbd::client::fuzzing;
use tandem_drivers::nbd::proto::HeaderStyle;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    if first & 1 == 0 {
        fuzzing::handshake(rest, first & 2 != 0, first & 4 != 0);
    } else {
        let style = match (first >> 1) % 3 {
            0 => HeaderStyle::Simple,
            1 => HeaderStyle::Structured,
            _ => HeaderStyle::Extended,
        };
        fuzzing::replies(style, rest);
    }
});
