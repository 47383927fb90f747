//! The client's side of the fixed-newstyle handshake, over any blocking byte stream (a socket
//! with a timeout at open and reconnect time; a byte buffer in the tests). It prefers
//! extended headers, then structured replies, asks for `base:allocation`, and ends with
//! OPT_GO (or EXPORT_NAME for a server without GO, when extended headers were not agreed).
//! The wire format is `proto`'s; this file only decides what to send next.

use super::super::proto::{self, options as opt, HeaderStyle};
use std::io::{Read, Write};

/// What the handshake agreed on: everything the transmission phase needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub style: HeaderStyle,
    pub size_bytes: u64,
    /// Transmission flags (`proto::FLAG_*`).
    pub flags: u16,
    /// The server's block sizes; the spec's defaults (1, 4096, 32 MiB) when it sent none.
    pub sizes: opt::BlockSizes,
    /// The id of `base:allocation`, when the server agreed to it.
    pub allocation_context: Option<u32>,
}

/// What the handshake wants.
#[derive(Debug, Clone)]
pub struct Wanted<'a> {
    pub export: &'a str,
    pub extended_headers: bool,
    pub structured_replies: bool,
}

/// How a handshake failed; the caller adds the target's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// I/O error or the server closed (errno).
    Io(i32),
    /// The server broke the protocol.
    Protocol(String),
    /// The server refused the export.
    Refused { option: &'static str, reply: String, message: String },
}

impl From<std::io::Error> for Failure {
    fn from(error: std::io::Error) -> Failure {
        match error.kind() {
            std::io::ErrorKind::UnexpectedEof => Failure::Protocol("the server closed the connection".into()),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Failure::Io(libc::ETIMEDOUT),
            _ => Failure::Io(error.raw_os_error().unwrap_or(libc::EIO)),
        }
    }
}

type Result<T> = std::result::Result<T, Failure>;

/// Option replies longer than this are a broken or hostile server (the longest legitimate
/// one is a 4096-byte string plus a few words).
const OPTION_REPLY_BYTES_MAX: u32 = 64 << 10;
/// Option replies one option may produce (meta contexts, infos) before we give up.
const OPTION_REPLIES_MAX: usize = 64;

/// The spec's defaults when the server sends no NBD_INFO_BLOCK_SIZE.
const DEFAULT_SIZES: opt::BlockSizes = opt::BlockSizes { minimum: 1, preferred: 4096, maximum: 32 << 20 };

pub fn negotiate(stream: &mut (impl Read + Write), wanted: &Wanted) -> Result<Negotiated> {
    let no_zeroes = greeting(stream)?;
    let mut style = HeaderStyle::Simple;
    if wanted.extended_headers && simple_option(stream, opt::OPT_EXTENDED_HEADERS)? {
        style = HeaderStyle::Extended;
    } else if wanted.structured_replies && simple_option(stream, opt::OPT_STRUCTURED_REPLY)? {
        style = HeaderStyle::Structured;
    }
    let allocation_context = match style.structured() {
        true => set_meta_context(stream, wanted.export)?,
        false => None,
    };
    match go(stream, wanted.export)? {
        Some((size_bytes, flags, sizes)) => Ok(Negotiated { style, size_bytes, flags, sizes, allocation_context }),
        None if style == HeaderStyle::Extended => Err(Failure::Protocol("extended headers without NBD_OPT_GO".into())),
        None => {
            let (size_bytes, flags) = export_name(stream, wanted.export, no_zeroes)?;
            // Without GO the server could not tell us about meta contexts being used.
            let allocation_context = None;
            Ok(Negotiated { style, size_bytes, flags, sizes: DEFAULT_SIZES, allocation_context })
        }
    }
}

/// Read the server's greeting and answer with our flags; whether NO_ZEROES is agreed.
fn greeting(stream: &mut (impl Read + Write)) -> Result<bool> {
    let mut hello = [0u8; 18];
    stream.read_exact(&mut hello)?;
    let magic = u64::from_be_bytes(hello[..8].try_into().expect("8 bytes"));
    if magic != proto::INIT_MAGIC {
        return Err(Failure::Protocol(format!("not an NBD server (magic {magic:#x})")));
    }
    let second = u64::from_be_bytes(hello[8..16].try_into().expect("8 bytes"));
    if second != proto::OPTION_MAGIC {
        return Err(Failure::Protocol("an oldstyle server (only newstyle is supported)".into()));
    }
    let flags = u16::from_be_bytes([hello[16], hello[17]]);
    if flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(Failure::Protocol("the server does not do fixed newstyle".into()));
    }
    let no_zeroes = flags & proto::FLAG_NO_ZEROES != 0;
    let mut client = proto::FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        client |= proto::FLAG_C_NO_ZEROES;
    }
    stream.write_all(&client.to_be_bytes())?;
    Ok(no_zeroes)
}

fn send_option(stream: &mut impl Write, option: u32, data: &[u8]) -> Result<()> {
    let mut bytes = Vec::with_capacity(opt::OPTION_HEADER_BYTES + data.len());
    opt::encode_option(option, data, &mut bytes);
    stream.write_all(&bytes)?;
    Ok(())
}

/// One option reply: its header and data, checked to answer `option`.
fn read_reply(stream: &mut impl Read, option: u32) -> Result<(u32, Vec<u8>)> {
    let mut header = [0u8; opt::OPTION_REPLY_HEADER_BYTES];
    stream.read_exact(&mut header)?;
    let parsed = opt::parse_option_reply_header(&header)
        .ok_or_else(|| Failure::Protocol("an option reply with a bad magic".into()))?;
    if parsed.option != option {
        return Err(Failure::Protocol(format!("a reply to option {} where {option} was asked", parsed.option)));
    }
    if parsed.length > OPTION_REPLY_BYTES_MAX {
        return Err(Failure::Protocol(format!("an option reply of {} bytes", parsed.length)));
    }
    let mut data = vec![0u8; parsed.length as usize];
    stream.read_exact(&mut data)?;
    Ok((parsed.reply, data))
}

/// An option without data answered by one ACK or one error: whether it was acknowledged.
fn simple_option(stream: &mut (impl Read + Write), option: u32) -> Result<bool> {
    send_option(stream, option, &[])?;
    let (reply, _) = read_reply(stream, option)?;
    match reply {
        opt::REP_ACK => Ok(true),
        r if opt::is_error_reply(r) => Ok(false),
        r => Err(Failure::Protocol(format!("reply {r:#x} to option {option}"))),
    }
}

/// Ask for `base:allocation`; its id if the server agreed.
fn set_meta_context(stream: &mut (impl Read + Write), export: &str) -> Result<Option<u32>> {
    let option = opt::OPT_SET_META_CONTEXT;
    send_option(stream, option, &opt::encode_meta_context_request(export, &["base:allocation"]))?;
    let mut id = None;
    for _ in 0..OPTION_REPLIES_MAX {
        let (reply, data) = read_reply(stream, option)?;
        match reply {
            opt::REP_META_CONTEXT => {
                let (context, name) = opt::parse_meta_context_reply(&data)
                    .ok_or_else(|| Failure::Protocol("a short meta context reply".into()))?;
                if name == "base:allocation" {
                    id = Some(context);
                }
            }
            opt::REP_ACK => return Ok(id),
            r if opt::is_error_reply(r) => return Ok(None), // block status stays off
            r => return Err(Failure::Protocol(format!("reply {r:#x} to SET_META_CONTEXT"))),
        }
    }
    Err(Failure::Protocol("too many meta context replies".into()))
}

/// OPT_GO: the export's size, flags and block sizes, or `None` when the server does not
/// know GO (the caller falls back to EXPORT_NAME).
fn go(stream: &mut (impl Read + Write), export: &str) -> Result<Option<(u64, u16, opt::BlockSizes)>> {
    let option = opt::OPT_GO;
    send_option(stream, option, &opt::encode_info_request(export, &[opt::INFO_BLOCK_SIZE]))?;
    let (mut export_info, mut sizes) = (None, DEFAULT_SIZES);
    for _ in 0..OPTION_REPLIES_MAX {
        let (reply, data) = read_reply(stream, option)?;
        match reply {
            opt::REP_INFO => match opt::parse_info_reply(&data) {
                Some(opt::Info::Export { size_bytes, flags }) => export_info = Some((size_bytes, flags)),
                Some(opt::Info::BlockSize(given)) if given.is_valid() => sizes = given,
                Some(opt::Info::BlockSize(given)) => {
                    return Err(Failure::Protocol(format!("invalid block sizes {given:?}")));
                }
                Some(_) => {}
                None => return Err(Failure::Protocol("a malformed NBD_REP_INFO".into())),
            },
            opt::REP_ACK => {
                let (size_bytes, flags) =
                    export_info.ok_or_else(|| Failure::Protocol("GO acknowledged without NBD_INFO_EXPORT".into()))?;
                return Ok(Some((size_bytes, flags, sizes)));
            }
            opt::REP_ERR_UNSUP => return Ok(None),
            r if opt::is_error_reply(r) => {
                let message = String::from_utf8_lossy(&data).into_owned();
                return Err(Failure::Refused { option: "NBD_OPT_GO", reply: reply_name(r), message });
            }
            r => return Err(Failure::Protocol(format!("reply {r:#x} to GO"))),
        }
    }
    Err(Failure::Protocol("too many GO replies".into()))
}

/// The old way in: no reply header; the server closes the connection to refuse.
fn export_name(stream: &mut (impl Read + Write), export: &str, no_zeroes: bool) -> Result<(u64, u16)> {
    send_option(stream, opt::OPT_EXPORT_NAME, export.as_bytes())?;
    let mut reply = [0u8; 10 + 124];
    let length = if no_zeroes { 10 } else { reply.len() };
    stream.read_exact(&mut reply[..length]).map_err(|error| match error.kind() {
        std::io::ErrorKind::UnexpectedEof => Failure::Refused {
            option: "NBD_OPT_EXPORT_NAME",
            reply: "connection closed".into(),
            message: String::new(),
        },
        _ => error.into(),
    })?;
    let size_bytes = u64::from_be_bytes(reply[..8].try_into().expect("8 bytes"));
    Ok((size_bytes, u16::from_be_bytes([reply[8], reply[9]])))
}

fn reply_name(reply: u32) -> String {
    let name = match reply {
        opt::REP_ERR_UNSUP => "unsupported",
        opt::REP_ERR_POLICY => "refused by policy",
        opt::REP_ERR_INVALID => "invalid",
        opt::REP_ERR_PLATFORM => "unsupported on this platform",
        opt::REP_ERR_TLS_REQD => "TLS required",
        opt::REP_ERR_UNKNOWN => "no such export",
        opt::REP_ERR_SHUTDOWN => "server shutting down",
        opt::REP_ERR_BLOCK_SIZE_REQD => "block size negotiation required",
        opt::REP_ERR_TOO_BIG => "too big",
        opt::REP_ERR_EXT_HEADER_REQD => "extended headers required",
        _ => return format!("error {reply:#x}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted server: what it says is fixed in advance, what the client sends is kept.
    struct Script {
        input: std::io::Cursor<Vec<u8>>,
        sent: Vec<u8>,
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.sent.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn hello(flags: u16) -> Vec<u8> {
        let mut bytes = proto::INIT_MAGIC.to_be_bytes().to_vec();
        bytes.extend_from_slice(&proto::OPTION_MAGIC.to_be_bytes());
        bytes.extend_from_slice(&flags.to_be_bytes());
        bytes
    }

    fn wanted() -> Wanted<'static> {
        Wanted { export: "disk", extended_headers: true, structured_replies: true }
    }

    fn run(server: Vec<u8>) -> (Result<Negotiated>, Vec<u8>) {
        let mut script = Script { input: std::io::Cursor::new(server), sent: Vec::new() };
        let result = negotiate(&mut script, &wanted());
        (result, script.sent)
    }

    #[test]
    fn extended_headers_meta_context_and_go() {
        let mut server = hello(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
        opt::encode_option_reply(opt::OPT_EXTENDED_HEADERS, opt::REP_ACK, &[], &mut server);
        let context = opt::encode_meta_context_reply(3, "base:allocation");
        opt::encode_option_reply(opt::OPT_SET_META_CONTEXT, opt::REP_META_CONTEXT, &context, &mut server);
        opt::encode_option_reply(opt::OPT_SET_META_CONTEXT, opt::REP_ACK, &[], &mut server);
        let sizes = opt::BlockSizes { minimum: 512, preferred: 4096, maximum: 1 << 20 };
        opt::encode_option_reply(opt::OPT_GO, opt::REP_INFO, &opt::encode_info_block_size(sizes), &mut server);
        opt::encode_option_reply(opt::OPT_GO, opt::REP_INFO, &opt::encode_info_export(1 << 30, 0x4d), &mut server);
        opt::encode_option_reply(opt::OPT_GO, opt::REP_ACK, &[], &mut server);
        let (result, sent) = run(server);
        let negotiated = result.unwrap();
        let expected = Negotiated {
            style: HeaderStyle::Extended,
            size_bytes: 1 << 30,
            flags: 0x4d,
            sizes,
            allocation_context: Some(3),
        };
        assert_eq!(negotiated, expected);
        let client_flags = u32::from_be_bytes(sent[..4].try_into().unwrap());
        assert_eq!(client_flags, proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES);
    }

    #[test]
    fn an_old_server_gets_export_name_with_zeroes() {
        let mut server = hello(proto::FLAG_FIXED_NEWSTYLE);
        for option in [opt::OPT_EXTENDED_HEADERS, opt::OPT_STRUCTURED_REPLY, opt::OPT_GO] {
            opt::encode_error_reply(option, opt::REP_ERR_UNSUP, "", &mut server);
        }
        opt::encode_export_name_reply(4096, 0x3, false, &mut server);
        let (result, sent) = run(server);
        let negotiated = result.unwrap();
        assert_eq!((negotiated.style, negotiated.size_bytes, negotiated.flags), (HeaderStyle::Simple, 4096, 3));
        assert_eq!(negotiated.sizes, DEFAULT_SIZES);
        assert!(sent.ends_with(b"disk"), "EXPORT_NAME's data is the bare name");
    }

    #[test]
    fn refusals_and_broken_servers_are_named() {
        let mut server = hello(proto::FLAG_FIXED_NEWSTYLE);
        opt::encode_error_reply(opt::OPT_EXTENDED_HEADERS, opt::REP_ERR_UNSUP, "", &mut server);
        opt::encode_option_reply(opt::OPT_STRUCTURED_REPLY, opt::REP_ACK, &[], &mut server);
        opt::encode_error_reply(opt::OPT_SET_META_CONTEXT, opt::REP_ERR_UNKNOWN, "", &mut server);
        opt::encode_error_reply(opt::OPT_GO, opt::REP_ERR_UNKNOWN, "no disk here", &mut server);
        let failure = run(server).0.unwrap_err();
        let expected =
            Failure::Refused { option: "NBD_OPT_GO", reply: "no such export".into(), message: "no disk here".into() };
        assert_eq!(failure, expected);
        let mut bytes = hello(proto::FLAG_FIXED_NEWSTYLE);
        bytes[0] ^= 1;
        assert!(matches!(run(bytes).0, Err(Failure::Protocol(m)) if m.contains("not an NBD server")));
        let truncated = hello(proto::FLAG_FIXED_NEWSTYLE);
        assert!(matches!(run(truncated).0, Err(Failure::Protocol(m)) if m.contains("closed")));
    }

    #[test]
    fn an_oversized_option_reply_is_refused() {
        let mut server = hello(proto::FLAG_FIXED_NEWSTYLE);
        server.extend_from_slice(&proto::OPTION_REPLY_MAGIC.to_be_bytes());
        server.extend_from_slice(&opt::OPT_EXTENDED_HEADERS.to_be_bytes());
        server.extend_from_slice(&opt::REP_ACK.to_be_bytes());
        server.extend_from_slice(&(1u32 << 30).to_be_bytes());
        assert!(matches!(run(server).0, Err(Failure::Protocol(m)) if m.contains("bytes")));
    }
}
