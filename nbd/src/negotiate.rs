//! The server's side of the fixed newstyle handshake as a state machine without I/O: it takes
//! one option at a time and writes the replies into a buffer, so the connection code only
//! moves bytes, and tests and the fuzz target drive it with any bytes they like.
//!
//! What it enforces (NBD proto.md, "Option haggling"): unknown options get NBD_REP_ERR_UNSUP
//! and negotiation goes on; malformed data gets NBD_REP_ERR_INVALID; SET_META_CONTEXT needs
//! structured replies or extended headers first; STRUCTURED_REPLY after EXTENDED_HEADERS gets
//! NBD_REP_ERR_EXT_HEADER_REQD; EXPORT_NAME for an unknown export (which cannot carry an
//! error) and ABORT close the connection.

use crate::export::{Export, ExportTable, MetaContext};
use std::sync::Arc;
use tandem_drivers::nbd::proto::options::{self as opt, OptionRequest};
use tandem_drivers::nbd::proto::{self, HeaderStyle};

/// Options one connection may send before it must choose an export: a client that loops on
/// LIST or INFO is cut off long before the handshake timeout would.
pub const OPTION_COUNT_MAX: u32 = 1024;
/// The largest option data the server reads into memory; longer data is skipped and answered
/// with NBD_REP_ERR_TOO_BIG.
pub const OPTION_DATA_BYTES_MAX: u32 = 64 << 10;

/// What the connection does after sending the bytes the machine wrote.
#[derive(Debug)]
pub enum Outcome {
    /// Read the next option.
    Continue,
    /// Close the connection.
    Close,
    /// Enter the transmission phase.
    Transmission(Selected),
}

/// What the client chose: the export, the headers to use and the meta contexts it selected,
/// whose ids are their index plus one.
#[derive(Debug)]
pub struct Selected {
    pub export: Arc<Export>,
    pub style: HeaderStyle,
    pub contexts: Vec<MetaContext>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export").field("name", &self.options.name).field("disk", &self.disk.name()).finish()
    }
}

/// Why a client was refused before any option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GreetingError {
    #[error("client flags {flags:#x} lack FIXED_NEWSTYLE (old clients are not supported)")]
    NotFixedNewstyle { flags: u32 },
    #[error("client flags {flags:#x} set bits this server does not know")]
    UnknownFlags { flags: u32 },
}

/// The 18 bytes the server sends first: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn greeting(out: &mut Vec<u8>) {
    out.extend_from_slice(&proto::INIT_MAGIC.to_be_bytes());
    out.extend_from_slice(&proto::OPTION_MAGIC.to_be_bytes());
    out.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
}

pub struct Negotiation {
    no_zeroes: bool,
    style: HeaderStyle,
    /// The export a SET_META_CONTEXT named, and what it selected there.
    selection: Option<(String, Vec<MetaContext>)>,
    option_count: u32,
}

impl Negotiation {
    /// Start after reading the client's 32-bit flags.
    pub fn new(client_flags: u32) -> Result<Negotiation, GreetingError> {
        if client_flags & proto::FLAG_C_FIXED_NEWSTYLE == 0 {
            return Err(GreetingError::NotFixedNewstyle { flags: client_flags });
        }
        if client_flags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
            return Err(GreetingError::UnknownFlags { flags: client_flags });
        }
        let no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;
        Ok(Negotiation { no_zeroes, style: HeaderStyle::Simple, selection: None, option_count: 0 })
    }

    /// Answer an option whose data was too long to read (the caller skipped it).
    pub fn oversized(&mut self, option: u32, length: u32, out: &mut Vec<u8>) -> Outcome {
        assert!(length > OPTION_DATA_BYTES_MAX);
        if !self.count() {
            return Outcome::Close;
        }
        let message = format!("option data of {length} bytes exceeds {OPTION_DATA_BYTES_MAX}");
        opt::encode_error_reply(option, opt::REP_ERR_TOO_BIG, &message, out);
        Outcome::Continue
    }

    /// Answer one option.
    pub fn handle(&mut self, option: u32, data: &[u8], exports: &ExportTable, out: &mut Vec<u8>) -> Outcome {
        assert!(data.len() <= OPTION_DATA_BYTES_MAX as usize, "the caller skips oversized data");
        if !self.count() {
            return Outcome::Close;
        }
        let request = match opt::parse_option(option, data) {
            Ok(request) => request,
            // EXPORT_NAME has no option reply to carry an error: the spec says close.
            Err(_) if option == opt::OPT_EXPORT_NAME => return Outcome::Close,
            Err(e) => {
                opt::encode_error_reply(option, opt::REP_ERR_INVALID, &e.to_string(), out);
                return Outcome::Continue;
            }
        };
        match request {
            OptionRequest::ExportName { name } => self.export_name(&name, exports, out),
            OptionRequest::Abort => {
                opt::encode_option_reply(option, opt::REP_ACK, &[], out);
                Outcome::Close
            }
            OptionRequest::List => list(exports, out),
            OptionRequest::StartTls => error(option, opt::REP_ERR_UNSUP, "TLS is not supported by this server", out),
            OptionRequest::Info { go, name, requests } => self.info(go, &name, &requests, exports, out),
            OptionRequest::StructuredReply => self.structured_reply(out),
            OptionRequest::MetaContext { set, export, queries } => {
                self.meta_context(set, &export, &queries, exports, out)
            }
            OptionRequest::ExtendedHeaders => {
                self.style = HeaderStyle::Extended;
                opt::encode_option_reply(option, opt::REP_ACK, &[], out);
                Outcome::Continue
            }
            OptionRequest::Unknown { option } => error(option, opt::REP_ERR_UNSUP, "unknown option", out),
        }
    }

    /// Count an option; false once the client has sent too many.
    fn count(&mut self) -> bool {
        self.option_count += 1;
        self.option_count <= OPTION_COUNT_MAX
    }

    fn export_name(&mut self, name: &str, exports: &ExportTable, out: &mut Vec<u8>) -> Outcome {
        // EXPORT_NAME cannot carry an error, and a client that negotiated extended headers must
        // not send it: both end the connection.
        let Some(export) = exports.get(name).filter(|_| self.style != HeaderStyle::Extended) else {
            return Outcome::Close;
        };
        let flags = export.transmission_flags(self.style.structured());
        opt::encode_export_name_reply(export.disk.size_bytes(), flags, self.no_zeroes, out);
        self.enter(export)
    }

    fn info(&mut self, go: bool, name: &str, requests: &[u16], exports: &ExportTable, out: &mut Vec<u8>) -> Outcome {
        let option = if go { opt::OPT_GO } else { opt::OPT_INFO };
        let Some(export) = exports.get(name) else {
            return error(option, opt::REP_ERR_UNKNOWN, &format!("export '{name}' not found"), out);
        };
        let reply = |data: Vec<u8>, out: &mut Vec<u8>| opt::encode_option_reply(option, opt::REP_INFO, &data, out);
        for kind in requests {
            match *kind {
                opt::INFO_NAME => reply(opt::encode_info_text(opt::INFO_NAME, export.name()), out),
                opt::INFO_DESCRIPTION => {
                    let description = export.options.description.as_deref().unwrap_or_default();
                    reply(opt::encode_info_text(opt::INFO_DESCRIPTION, description), out);
                }
                _ => {} // EXPORT and BLOCK_SIZE always go below; unknown kinds are ignored
            }
        }
        // Block sizes go out whether asked or not: a client that ignores them gets EINVAL for
        // a misaligned request instead of a silent read-modify-write.
        reply(opt::encode_info_block_size(export.block_sizes()), out);
        let flags = export.transmission_flags(self.style.structured());
        reply(opt::encode_info_export(export.disk.size_bytes(), flags), out);
        opt::encode_option_reply(option, opt::REP_ACK, &[], out);
        if go {
            self.enter(export)
        } else {
            Outcome::Continue
        }
    }

    fn structured_reply(&mut self, out: &mut Vec<u8>) -> Outcome {
        let option = opt::OPT_STRUCTURED_REPLY;
        if self.style == HeaderStyle::Extended {
            return error(option, opt::REP_ERR_EXT_HEADER_REQD, "extended headers are already in use", out);
        }
        self.style = HeaderStyle::Structured;
        opt::encode_option_reply(option, opt::REP_ACK, &[], out);
        Outcome::Continue
    }

    fn meta_context(
        &mut self,
        set: bool,
        name: &str,
        queries: &[String],
        exports: &ExportTable,
        out: &mut Vec<u8>,
    ) -> Outcome {
        let option = if set { opt::OPT_SET_META_CONTEXT } else { opt::OPT_LIST_META_CONTEXT };
        if set {
            self.selection = None; // a SET replaces the selection, even when it fails
        }
        if !self.style.structured() {
            return error(option, opt::REP_ERR_INVALID, "negotiate structured replies first", out);
        }
        let Some(export) = exports.get(name) else {
            return error(option, opt::REP_ERR_UNKNOWN, &format!("export '{name}' not found"), out);
        };
        let offered = export.meta_contexts();
        let chosen: Vec<MetaContext> = match (set, queries.is_empty()) {
            (true, true) => Vec::new(), // the spec: no queries select nothing
            (false, true) => offered,
            _ => offered.into_iter().filter(|c| queries.iter().any(|q| c.matches(q, !set))).collect(),
        };
        for (index, context) in chosen.iter().enumerate() {
            // A SET's ids are 1-based positions in the selection; a LIST's SHOULD be 0.
            let id = if set { index as u32 + 1 } else { 0 };
            let data = opt::encode_meta_context_reply(id, &context.name());
            opt::encode_option_reply(option, opt::REP_META_CONTEXT, &data, out);
        }
        opt::encode_option_reply(option, opt::REP_ACK, &[], out);
        if set {
            self.selection = Some((name.to_string(), chosen));
        }
        Outcome::Continue
    }

    fn enter(&mut self, export: Arc<Export>) -> Outcome {
        // Contexts count only if the last SET named the export finally chosen.
        let contexts = match self.selection.take() {
            Some((name, contexts)) if name == export.name() => contexts,
            _ => Vec::new(),
        };
        Outcome::Transmission(Selected { export, style: self.style, contexts })
    }
}

fn error(option: u32, reply: u32, message: &str, out: &mut Vec<u8>) -> Outcome {
    opt::encode_error_reply(option, reply, message, out);
    Outcome::Continue
}

fn list(exports: &ExportTable, out: &mut Vec<u8>) -> Outcome {
    for export in exports.list() {
        let description = export.options.description.as_deref().unwrap_or_default();
        let data = opt::encode_server_entry(export.name(), description);
        opt::encode_option_reply(opt::OPT_LIST, opt::REP_SERVER, &data, out);
    }
    opt::encode_option_reply(opt::OPT_LIST, opt::REP_ACK, &[], out);
    Outcome::Continue
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::ExportOptions;
    use tandem::block::Disk;
    use tandem_drivers::nbd::proto::options::{parse_option_reply_header, OPTION_REPLY_HEADER_BYTES};
    use tandem_drivers::MemoryDriver;

    fn table() -> ExportTable {
        let disk = Disk::new(Arc::new(MemoryDriver::new(1 << 20)));
        disk.bitmaps().add("b0", tandem::bitmap::DirtyBitmap::new(65536, 1 << 20).unwrap()).unwrap();
        let table = ExportTable::default();
        let options = ExportOptions { writable: true, bitmaps: vec!["b0".into()], ..ExportOptions::new("disk") };
        table.add(Export::new(disk, options).unwrap()).unwrap();
        table
    }

    /// The option replies in `out`, as (reply type, data).
    fn replies(out: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut at = 0;
        let mut found = Vec::new();
        while at < out.len() {
            let header = parse_option_reply_header(&out[at..]).expect("a reply header");
            let start = at + OPTION_REPLY_HEADER_BYTES;
            found.push((header.reply, out[start..start + header.length as usize].to_vec()));
            at = start + header.length as usize;
        }
        found
    }

    fn negotiation() -> Negotiation {
        Negotiation::new(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).unwrap()
    }

    #[test]
    fn unknown_options_get_unsup_and_negotiation_goes_on() {
        let (table, mut n, mut out) = (table(), negotiation(), Vec::new());
        assert!(matches!(n.handle(99, b"junk", &table, &mut out), Outcome::Continue));
        assert_eq!(replies(&out)[0].0, opt::REP_ERR_UNSUP);
        out.clear();
        let data = opt::encode_info_request("disk", &[]);
        assert!(matches!(n.handle(opt::OPT_GO, &data, &table, &mut out), Outcome::Transmission(_)));
    }

    #[test]
    fn go_sends_block_size_and_export_then_ack() {
        let (table, mut n, mut out) = (table(), negotiation(), Vec::new());
        let data = opt::encode_info_request("disk", &[opt::INFO_NAME, opt::INFO_BLOCK_SIZE]);
        let Outcome::Transmission(selected) = n.handle(opt::OPT_GO, &data, &table, &mut out) else { panic!() };
        assert_eq!(selected.style, HeaderStyle::Simple);
        let kinds: Vec<u32> = replies(&out).iter().map(|r| r.0).collect();
        assert_eq!(kinds, [opt::REP_INFO, opt::REP_INFO, opt::REP_INFO, opt::REP_ACK]);
        let infos: Vec<_> = replies(&out).iter().filter_map(|r| opt::parse_info_reply(&r.1)).collect();
        assert!(infos.contains(&opt::Info::Name("disk".into())));
        assert!(infos.iter().any(|i| matches!(i, opt::Info::Export { size_bytes: 1048576, .. })));
    }

    #[test]
    fn an_unknown_export_is_an_error_for_go_and_a_close_for_export_name() {
        let (table, mut n, mut out) = (table(), negotiation(), Vec::new());
        let data = opt::encode_info_request("nope", &[]);
        assert!(matches!(n.handle(opt::OPT_GO, &data, &table, &mut out), Outcome::Continue));
        assert_eq!(replies(&out)[0].0, opt::REP_ERR_UNKNOWN);
        assert!(matches!(n.handle(opt::OPT_EXPORT_NAME, b"nope", &table, &mut out), Outcome::Close));
        let before = out.len();
        assert!(matches!(n.handle(opt::OPT_EXPORT_NAME, b"bad\0name", &table, &mut out), Outcome::Close));
        assert_eq!(out.len(), before, "EXPORT_NAME never gets an option reply");
    }

    #[test]
    fn meta_contexts_need_structured_replies_and_follow_the_chosen_export() {
        let (table, mut n, mut out) = (table(), negotiation(), Vec::new());
        let set = opt::encode_meta_context_request("disk", &["base:allocation", "qemu:dirty-bitmap:b0"]);
        n.handle(opt::OPT_SET_META_CONTEXT, &set, &table, &mut out);
        assert_eq!(replies(&out)[0].0, opt::REP_ERR_INVALID);
        out.clear();
        n.handle(opt::OPT_EXTENDED_HEADERS, &[], &table, &mut out);
        n.handle(opt::OPT_STRUCTURED_REPLY, &[], &table, &mut out);
        assert_eq!(replies(&out)[1].0, opt::REP_ERR_EXT_HEADER_REQD);
        out.clear();
        n.handle(opt::OPT_SET_META_CONTEXT, &set, &table, &mut out);
        let names: Vec<_> =
            replies(&out).iter().filter_map(|r| opt::parse_meta_context_reply(&r.1).filter(|_| r.0 == 4)).collect();
        assert!(names.iter().all(|(id, _)| *id != 0), "a SET gives real ids");
        assert_eq!(names, [(1, "base:allocation".to_string()), (2, "qemu:dirty-bitmap:b0".to_string())]);
        let go = opt::encode_info_request("disk", &[]);
        let Outcome::Transmission(selected) = n.handle(opt::OPT_GO, &go, &table, &mut out) else { panic!() };
        assert_eq!((selected.style, selected.contexts.len()), (HeaderStyle::Extended, 2));
    }

    #[test]
    fn list_meta_context_expands_namespaces() {
        let (table, mut n, mut out) = (table(), negotiation(), Vec::new());
        n.handle(opt::OPT_STRUCTURED_REPLY, &[], &table, &mut out);
        out.clear();
        let list = opt::encode_meta_context_request("disk", &["qemu:"]);
        n.handle(opt::OPT_LIST_META_CONTEXT, &list, &table, &mut out);
        let found = replies(&out).iter().filter(|r| r.0 == opt::REP_META_CONTEXT).count();
        assert_eq!(found, 1, "qemu: lists the one exported bitmap");
    }

    #[test]
    fn old_style_and_unknown_client_flags_are_refused() {
        assert!(matches!(Negotiation::new(0), Err(GreetingError::NotFixedNewstyle { .. })));
        assert!(matches!(Negotiation::new(1 | 8), Err(GreetingError::UnknownFlags { flags: 9 })));
    }

    #[test]
    fn a_client_that_never_chooses_is_cut_off() {
        let (table, mut n, mut out) = (table(), negotiation(), Vec::new());
        for _ in 0..OPTION_COUNT_MAX {
            assert!(matches!(n.handle(opt::OPT_LIST, &[], &table, &mut out), Outcome::Continue));
        }
        assert!(matches!(n.handle(opt::OPT_LIST, &[], &table, &mut out), Outcome::Close));
    }
}
