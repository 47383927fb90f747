//! The handshake's messages: option requests (client to server) and option replies (server to
//! client), the `NBD_INFO_*` payloads and meta-context queries. Pure byte work, like the rest
//! of `proto`: the server's and the client's negotiation drive it.

use super::{truncate_utf8, STRING_BYTES_MAX};

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR + 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR + 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR + 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR + 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR + 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERR + 10;

/// Whether an option reply type is an error.
pub fn is_error_reply(reply: u32) -> bool {
    reply & REP_ERR != 0
}

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Bytes of an option request header (IHAVEOPT, option, length).
pub const OPTION_HEADER_BYTES: usize = 16;
/// Bytes of an option reply header (magic, option, reply type, length).
pub const OPTION_REPLY_HEADER_BYTES: usize = 20;
/// Meta-context queries one SET or LIST may carry. The spec sets no limit; ours keeps a
/// hostile client from making the server build an unbounded reply.
pub const QUERY_COUNT_MAX: usize = 128;
/// Info requests one INFO or GO may carry.
pub const INFO_REQUEST_COUNT_MAX: usize = 64;

/// A parsed option request, as the server sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionRequest {
    ExportName {
        name: String,
    },
    Abort,
    List,
    StartTls,
    /// INFO (`go` false) or GO (`go` true), with the info types the client asked for.
    Info {
        go: bool,
        name: String,
        requests: Vec<u16>,
    },
    StructuredReply,
    /// LIST_META_CONTEXT (`set` false) or SET_META_CONTEXT (`set` true).
    MetaContext {
        set: bool,
        export: String,
        queries: Vec<String>,
    },
    ExtendedHeaders,
    /// An option this implementation does not know: NBD_REP_ERR_UNSUP, and negotiation goes on.
    Unknown {
        option: u32,
    },
}

/// Why an option's data is unacceptable: the reply is NBD_REP_ERR_INVALID with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("option {option}: {reason}")]
pub struct OptionDataError {
    pub option: u32,
    pub reason: &'static str,
}

/// Parse option `option`'s `data` (EXPORT_NAME's data is the whole name).
pub fn parse_option(option: u32, data: &[u8]) -> Result<OptionRequest, OptionDataError> {
    let bad = |reason| OptionDataError { option, reason };
    let no_data = |request: OptionRequest| if data.is_empty() { Ok(request) } else { Err(bad("takes no data")) };
    match option {
        OPT_EXPORT_NAME => Ok(OptionRequest::ExportName { name: string(data).map_err(bad)? }),
        OPT_ABORT => Ok(OptionRequest::Abort), // data, if any, is ignored: the client is leaving
        OPT_LIST => no_data(OptionRequest::List),
        OPT_STARTTLS => no_data(OptionRequest::StartTls),
        OPT_STRUCTURED_REPLY => no_data(OptionRequest::StructuredReply),
        OPT_EXTENDED_HEADERS => no_data(OptionRequest::ExtendedHeaders),
        OPT_INFO | OPT_GO => parse_info(option == OPT_GO, data).map_err(bad),
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            parse_meta_context(option == OPT_SET_META_CONTEXT, data).map_err(bad)
        }
        _ => Ok(OptionRequest::Unknown { option }),
    }
}

/// A cursor over option data that names what ran short.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, bytes: usize, what: &'static str) -> Result<&'a [u8], &'static str> {
        if self.data.len() < bytes {
            return Err(what);
        }
        let (head, rest) = self.data.split_at(bytes);
        self.data = rest;
        Ok(head)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, &'static str> {
        Ok(u16::from_be_bytes(self.take(2, what)?.try_into().expect("2 bytes")))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, &'static str> {
        Ok(u32::from_be_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }

    /// A 32-bit length, then that many bytes of string.
    fn string(&mut self, what: &'static str) -> Result<String, &'static str> {
        let length = self.u32(what)? as usize;
        string(self.take(length, what)?)
    }
}

fn string(bytes: &[u8]) -> Result<String, &'static str> {
    if bytes.len() > STRING_BYTES_MAX {
        return Err("a string is longer than 4096 bytes");
    }
    let text = std::str::from_utf8(bytes).map_err(|_| "a string is not UTF-8")?;
    if text.contains('\0') {
        return Err("a string contains NUL");
    }
    Ok(text.to_string())
}

fn parse_info(go: bool, data: &[u8]) -> Result<OptionRequest, &'static str> {
    let mut reader = Reader { data };
    let name = reader.string("the export name is cut short")?;
    let count = usize::from(reader.u16("the info request count is missing")?);
    if count > INFO_REQUEST_COUNT_MAX {
        return Err("too many info requests");
    }
    let requests = (0..count).map(|_| reader.u16("info requests are cut short")).collect::<Result<Vec<_>, _>>()?;
    if !reader.data.is_empty() {
        return Err("data follows the info requests");
    }
    Ok(OptionRequest::Info { go, name, requests })
}

fn parse_meta_context(set: bool, data: &[u8]) -> Result<OptionRequest, &'static str> {
    let mut reader = Reader { data };
    let export = reader.string("the export name is cut short")?;
    let count = reader.u32("the query count is missing")? as usize;
    if count > QUERY_COUNT_MAX {
        return Err("too many meta-context queries");
    }
    let queries = (0..count).map(|_| reader.string("a query is cut short")).collect::<Result<Vec<_>, _>>()?;
    if !reader.data.is_empty() {
        return Err("data follows the queries");
    }
    Ok(OptionRequest::MetaContext { set, export, queries })
}

/// Encode an option request (client side): IHAVEOPT, option, length, data.
pub fn encode_option(option: u32, data: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&super::OPTION_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// The data of an INFO or GO request for `name`, asking for `requests`.
pub fn encode_info_request(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut data = Vec::with_capacity(6 + name.len() + 2 * requests.len());
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    requests.iter().for_each(|r| data.extend_from_slice(&r.to_be_bytes()));
    data
}

/// The data of a LIST or SET_META_CONTEXT request.
pub fn encode_meta_context_request(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut data = Vec::new();
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for query in queries {
        data.extend_from_slice(&(query.len() as u32).to_be_bytes());
        data.extend_from_slice(query.as_bytes());
    }
    data
}

/// An option reply header as the client reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply: u32,
    pub length: u32,
}

/// Parse an option reply header; `None` when the magic is wrong or the bytes too few.
pub fn parse_option_reply_header(bytes: &[u8]) -> Option<OptionReplyHeader> {
    if bytes.len() < OPTION_REPLY_HEADER_BYTES {
        return None;
    }
    let magic = u64::from_be_bytes(bytes[..8].try_into().ok()?);
    if magic != super::OPTION_REPLY_MAGIC {
        return None;
    }
    let word = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    Some(OptionReplyHeader { option: word(8), reply: word(12), length: word(16) })
}

/// Encode an option reply (server side).
pub fn encode_option_reply(option: u32, reply: u32, data: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&super::OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// An error reply with a message for humans.
pub fn encode_error_reply(option: u32, reply: u32, message: &str, out: &mut Vec<u8>) {
    assert!(is_error_reply(reply), "{reply:#x} is not an error reply");
    encode_option_reply(option, reply, truncate_utf8(message, STRING_BYTES_MAX).as_bytes(), out);
}

/// NBD_REP_SERVER's data: the name, then a description for humans.
pub fn encode_server_entry(name: &str, description: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(4 + name.len() + description.len());
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(truncate_utf8(description, STRING_BYTES_MAX).as_bytes());
    data
}

/// NBD_INFO_EXPORT's data: size and transmission flags.
pub fn encode_info_export(size_bytes: u64, flags: u16) -> Vec<u8> {
    let mut data = INFO_EXPORT.to_be_bytes().to_vec();
    data.extend_from_slice(&size_bytes.to_be_bytes());
    data.extend_from_slice(&flags.to_be_bytes());
    data
}

/// NBD_INFO_NAME or NBD_INFO_DESCRIPTION's data.
pub fn encode_info_text(kind: u16, text: &str) -> Vec<u8> {
    assert!(kind == INFO_NAME || kind == INFO_DESCRIPTION);
    let mut data = kind.to_be_bytes().to_vec();
    data.extend_from_slice(truncate_utf8(text, STRING_BYTES_MAX).as_bytes());
    data
}

/// The block sizes an export asks clients to honour, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    /// The largest payload (read or write) a request may carry.
    pub maximum: u32,
}

impl BlockSizes {
    /// The spec's rules: powers of two for minimum and preferred, min <= preferred, and a
    /// maximum that is a multiple of the minimum (or 0xffffffff) and at least the minimum.
    pub fn is_valid(&self) -> bool {
        self.minimum.is_power_of_two()
            && self.preferred.is_power_of_two()
            && self.minimum <= self.preferred
            && self.maximum >= self.minimum
            && (self.maximum.is_multiple_of(self.minimum) || self.maximum == u32::MAX)
    }
}

/// NBD_INFO_BLOCK_SIZE's data.
pub fn encode_info_block_size(sizes: BlockSizes) -> Vec<u8> {
    assert!(sizes.is_valid(), "{sizes:?}");
    let mut data = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for value in [sizes.minimum, sizes.preferred, sizes.maximum] {
        data.extend_from_slice(&value.to_be_bytes());
    }
    data
}

/// What an NBD_REP_INFO carries, as the client reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export {
        size_bytes: u64,
        flags: u16,
    },
    Name(String),
    Description(String),
    BlockSize(BlockSizes),
    /// An info type the client does not know: the spec says to ignore it.
    Other(u16),
}

/// Parse an NBD_REP_INFO's data; `None` when malformed.
pub fn parse_info_reply(data: &[u8]) -> Option<Info> {
    let kind = u16::from_be_bytes(data.get(..2)?.try_into().ok()?);
    let rest = &data[2..];
    let word = |at: usize| -> Option<u32> { Some(u32::from_be_bytes(rest.get(at..at + 4)?.try_into().ok()?)) };
    Some(match kind {
        INFO_EXPORT if rest.len() == 10 => Info::Export {
            size_bytes: u64::from_be_bytes(rest[..8].try_into().ok()?),
            flags: u16::from_be_bytes(rest[8..10].try_into().ok()?),
        },
        INFO_NAME => Info::Name(String::from_utf8_lossy(rest).into_owned()),
        INFO_DESCRIPTION => Info::Description(String::from_utf8_lossy(rest).into_owned()),
        INFO_BLOCK_SIZE if rest.len() == 12 => {
            Info::BlockSize(BlockSizes { minimum: word(0)?, preferred: word(4)?, maximum: word(8)? })
        }
        INFO_EXPORT | INFO_BLOCK_SIZE => return None,
        other => Info::Other(other),
    })
}

/// NBD_REP_META_CONTEXT's data: the context's id and name.
pub fn encode_meta_context_reply(id: u32, name: &str) -> Vec<u8> {
    let mut data = id.to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data
}

/// Parse NBD_REP_META_CONTEXT's data.
pub fn parse_meta_context_reply(data: &[u8]) -> Option<(u32, String)> {
    let id = u32::from_be_bytes(data.get(..4)?.try_into().ok()?);
    Some((id, String::from_utf8_lossy(&data[4..]).into_owned()))
}

/// The reply to NBD_OPT_EXPORT_NAME (no option reply header): size, flags, and 124 zero bytes
/// unless the client agreed to NO_ZEROES.
pub fn encode_export_name_reply(size_bytes: u64, flags: u16, no_zeroes: bool, out: &mut Vec<u8>) {
    out.extend_from_slice(&size_bytes.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_and_meta_context_requests_round_trip() {
        let data = encode_info_request("disk0", &[INFO_BLOCK_SIZE, INFO_NAME]);
        let parsed = parse_option(OPT_GO, &data).unwrap();
        assert_eq!(parsed, OptionRequest::Info { go: true, name: "disk0".into(), requests: vec![3, 1] });
        let data = encode_meta_context_request("", &["base:allocation", "qemu:dirty-bitmap:b0"]);
        let parsed = parse_option(OPT_SET_META_CONTEXT, &data).unwrap();
        let queries = vec!["base:allocation".to_string(), "qemu:dirty-bitmap:b0".to_string()];
        assert_eq!(parsed, OptionRequest::MetaContext { set: true, export: String::new(), queries });
    }

    #[test]
    fn bad_option_data_is_named_and_unknown_options_are_not_errors() {
        let mut data = encode_info_request("disk0", &[INFO_NAME]);
        data.pop();
        assert_eq!(parse_option(OPT_INFO, &data).unwrap_err().reason, "info requests are cut short");
        assert_eq!(parse_option(OPT_LIST, b"x").unwrap_err().reason, "takes no data");
        assert_eq!(parse_option(OPT_EXPORT_NAME, b"a\0b").unwrap_err().reason, "a string contains NUL");
        let huge = [0xffu8; 4];
        assert_eq!(parse_option(OPT_GO, &huge).unwrap_err().reason, "the export name is cut short");
        assert_eq!(parse_option(77, b"whatever").unwrap(), OptionRequest::Unknown { option: 77 });
    }

    #[test]
    fn replies_round_trip() {
        let mut bytes = Vec::new();
        encode_option_reply(OPT_GO, REP_INFO, &encode_info_export(1 << 30, 0x1ff), &mut bytes);
        let header = parse_option_reply_header(&bytes).unwrap();
        assert_eq!((header.option, header.reply, header.length), (OPT_GO, REP_INFO, 12));
        let info = parse_info_reply(&bytes[OPTION_REPLY_HEADER_BYTES..]).unwrap();
        assert_eq!(info, Info::Export { size_bytes: 1 << 30, flags: 0x1ff });
        let sizes = BlockSizes { minimum: 512, preferred: 4096, maximum: 32 << 20 };
        assert_eq!(parse_info_reply(&encode_info_block_size(sizes)), Some(Info::BlockSize(sizes)));
        assert_eq!(parse_meta_context_reply(&encode_meta_context_reply(4, "base:allocation")).unwrap().0, 4);
    }
}
