//! The NBD server's parsers, from the first byte a client sends: client flags, then options
//! (each `u32 option, u16 length, data`) into the handshake machine, then, if an export was
//! chosen, the rest as request headers (compact or extended, as negotiated) judged against it.
//! Also the option-reply and reply-header parsers the client uses, on the same bytes.
//! Invariant: no input panics; every reply the machine writes parses back as option replies.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};
use tandem::block::Disk;
use tandem_drivers::nbd::proto::{self, options as opt};
use tandem_drivers::MemoryDriver;
use tandem_nbd::negotiate::{Negotiation, Outcome, OPTION_DATA_BYTES_MAX};
use tandem_nbd::request::judge;
use tandem_nbd::{Export, ExportOptions, ExportTable};

fn table() -> &'static ExportTable {
    static TABLE: OnceLock<ExportTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let table = ExportTable::default();
        for (name, writable) in [("", true), ("ro", false)] {
            let disk = Disk::new(Arc::new(MemoryDriver::new(1 << 20)));
            let bitmap = tandem::bitmap::DirtyBitmap::new(65536, 1 << 20).expect("bitmap");
            disk.bitmaps().add("b0", bitmap).expect("one bitmap");
            let options = ExportOptions { writable, bitmaps: vec!["b0".into()], ..ExportOptions::new(name) };
            table.add(Export::new(disk, options).expect("export")).expect("unique");
        }
        table
    })
}

/// Every byte the machine wrote must be a sequence of well-formed option replies (or the
/// EXPORT_NAME answer, which only comes last: 10 bytes, or 134 without NO_ZEROES).
fn check_replies(out: &[u8]) {
    let mut at = 0;
    while let Some(header) = opt::parse_option_reply_header(&out[at..]) {
        at += opt::OPTION_REPLY_HEADER_BYTES + header.length as usize;
        assert!(at <= out.len(), "a reply's length runs past what was written");
    }
    assert!(at == out.len() || matches!(out.len() - at, 10 | 134), "unparsable reply bytes");
}

fuzz_target!(|data: &[u8]| {
    let Some((flags, mut rest)) = data.split_first_chunk::<4>() else { return };
    let Ok(mut negotiation) = Negotiation::new(u32::from_be_bytes(*flags)) else { return };
    let mut out = Vec::new();
    let selected = loop {
        let Some((head, tail)) = rest.split_first_chunk::<6>() else { return };
        let option = u32::from_be_bytes(head[..4].try_into().unwrap());
        // Twice the 16-bit field, so declared lengths reach past the server's option data limit.
        let declared = u32::from(u16::from_be_bytes([head[4], head[5]])) << 1;
        let length = (declared as usize).min(tail.len());
        let (option_data, tail) = tail.split_at(length);
        rest = tail;
        out.clear();
        let outcome = match declared > OPTION_DATA_BYTES_MAX {
            true => negotiation.oversized(option, declared, &mut out),
            false => negotiation.handle(option, option_data, table(), &mut out),
        };
        check_replies(&out);
        match outcome {
            Outcome::Continue => {}
            Outcome::Close => return,
            Outcome::Transmission(selected) => break selected,
        }
    };
    for header in rest.chunks(selected.style.request_bytes()) {
        let _ = proto::parse_reply_header(header);
        if let Ok(request) = proto::parse_request(header, selected.style) {
            let _ = judge(&request, selected.style, &selected.export, selected.contexts.len());
        }
    }
});
