//! NBD URIs as QEMU and libnbd spell them: `nbd://HOST[:PORT]/EXPORT` and
//! `nbd+unix:///EXPORT?socket=PATH`, parsed into an [`NbdUri`]. Nothing here connects.
//!
//! What is refused, and why: `nbds`/`nbds+unix` (TLS is not implemented here, and silently
//! connecting in clear text to something meant to be encrypted would be worse), `nbd+vsock`,
//! user info, fragments and query keys we do not know (a typo in `socket=` must not become
//! a TCP connection to localhost).

use std::fmt;
use std::path::PathBuf;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A host name or address (IPv6 without brackets) and a port.
    Tcp {
        host: String,
        port: u16,
    },
    Unix {
        path: PathBuf,
    },
}

/// A parsed NBD URI: where to connect and which export to ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub endpoint: Endpoint,
    /// The export name (percent-decoded; empty is the server's default export).
    pub export: String,
}

/// Why a URI was refused; `uri` is the text as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad NBD URI {uri}: {reason} (the forms are nbd://HOST[:PORT]/EXPORT and nbd+unix:///EXPORT?socket=PATH)")]
pub struct UriError {
    pub uri: String,
    pub reason: String,
}

/// Whether `text` looks like an NBD URI (so a caller choosing a driver by prefix picks us).
pub fn is_nbd_uri(text: &str) -> bool {
    ["nbd://", "nbd+unix://", "nbds://", "nbds+unix://", "nbd+vsock://"].iter().any(|p| text.starts_with(p))
}

impl NbdUri {
    pub fn parse(uri: &str) -> Result<NbdUri, UriError> {
        let bad = |reason: &str| UriError { uri: uri.to_string(), reason: reason.to_string() };
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let unix = match scheme {
            "nbd" | "nbd+tcp" => false,
            "nbd+unix" => true,
            "nbds" | "nbds+unix" | "nbds+tcp" => return Err(bad("TLS (nbds) is not supported")),
            "nbd+vsock" => return Err(bad("vsock is not supported")),
            _ => return Err(bad("the scheme is not nbd or nbd+unix")),
        };
        if rest.contains('#') {
            return Err(bad("a fragment is not allowed"));
        }
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, Some(query)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path).ok_or_else(|| bad("the export name has a bad %-escape"))?;
        if export.len() > super::proto::STRING_BYTES_MAX {
            return Err(bad("the export name is longer than 4096 bytes"));
        }
        let socket = parse_query(query).map_err(|reason| bad(&reason))?;
        let endpoint = if unix {
            if !authority.is_empty() {
                return Err(bad("nbd+unix takes no host (three slashes: nbd+unix:///EXPORT?socket=PATH)"));
            }
            let path = socket.ok_or_else(|| bad("nbd+unix needs ?socket=PATH"))?;
            Endpoint::Unix { path: PathBuf::from(path) }
        } else {
            if socket.is_some() {
                return Err(bad("socket= belongs to nbd+unix URIs"));
            }
            parse_authority(authority).map_err(bad)?
        };
        Ok(NbdUri { endpoint, export })
    }
}

/// `HOST[:PORT]` or `[V6ADDR][:PORT]`.
fn parse_authority(authority: &str) -> Result<Endpoint, &'static str> {
    if authority.contains('@') {
        return Err("user info is not allowed");
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("an IPv6 address misses its ]")?;
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':').ok_or("junk after the IPv6 address")?)),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("no host");
    }
    let port = match port {
        None => super::proto::DEFAULT_PORT,
        Some(text) => text.parse::<u16>().ok().filter(|&p| p != 0).ok_or("the port is not 1 to 65535")?,
    };
    Ok(Endpoint::Tcp { host: host.to_string(), port })
}

/// The query's `socket` value; any other key is refused.
fn parse_query(query: Option<&str>) -> Result<Option<String>, String> {
    let mut socket = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "socket" if socket.is_none() => {
                let path = percent_decode(value).ok_or("socket= has a bad %-escape")?;
                if path.is_empty() {
                    return Err("socket= is empty".into());
                }
                socket = Some(path);
            }
            "socket" => return Err("socket= is given twice".into()),
            _ => return Err(format!("unknown query key {key:?}")),
        }
    }
    Ok(socket)
}

/// Decode `%XX` escapes; `None` for a bad escape, non-UTF-8 or a NUL.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'%' {
            let hex = std::str::from_utf8(bytes.get(at + 1..at + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            at += 3;
        } else {
            out.push(bytes[at]);
            at += 1;
        }
    }
    String::from_utf8(out).ok().filter(|s| !s.contains('\0'))
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.endpoint {
            Endpoint::Tcp { host, port } if host.contains(':') => write!(f, "nbd://[{host}]:{port}/{}", self.export),
            Endpoint::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{}", self.export),
            Endpoint::Unix { path } => write!(f, "nbd+unix:///{}?socket={}", self.export, path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri { endpoint: Endpoint::Tcp { host: host.into(), port }, export: export.into() }
    }

    #[test]
    fn the_forms_qemu_and_libnbd_accept() {
        assert_eq!(NbdUri::parse("nbd://localhost/disk0").unwrap(), tcp("localhost", 10809, "disk0"));
        assert_eq!(NbdUri::parse("nbd://10.0.0.1:1234/").unwrap(), tcp("10.0.0.1", 1234, ""));
        assert_eq!(NbdUri::parse("nbd://host").unwrap(), tcp("host", 10809, ""));
        assert_eq!(NbdUri::parse("nbd://[::1]:99/a%20b").unwrap(), tcp("::1", 99, "a b"));
        assert_eq!(NbdUri::parse("nbd://[fe80::1]/x/y").unwrap(), tcp("fe80::1", 10809, "x/y"));
        let unix = NbdUri::parse("nbd+unix:///exp?socket=/run/nbd%2Esock").unwrap();
        assert_eq!(unix.endpoint, Endpoint::Unix { path: "/run/nbd.sock".into() });
        assert_eq!(unix.export, "exp");
        assert_eq!(NbdUri::parse("nbd+unix://?socket=/s").unwrap().export, "");
    }

    #[test]
    fn display_round_trips() {
        for text in ["nbd://h:5/e", "nbd://[::1]:7/", "nbd+unix:///e?socket=/tmp/s"] {
            let uri = NbdUri::parse(text).unwrap();
            assert_eq!(NbdUri::parse(&uri.to_string()).unwrap(), uri, "{text}");
        }
    }

    #[test]
    fn bad_uris_are_named_with_the_reason() {
        let cases = [
            ("nbds://h/e", "TLS"),
            ("http://h/e", "scheme"),
            ("nbd:/h", "no scheme"),
            ("nbd://h:0/e", "port"),
            ("nbd://h:99999/e", "port"),
            ("nbd://user@h/e", "user info"),
            ("nbd://:5/e", "no host"),
            ("nbd://[::1/e", "]"),
            ("nbd+unix:///e", "socket=PATH"),
            ("nbd+unix://host/e?socket=/s", "no host"),
            ("nbd+unix:///e?sockt=/s", "unknown query key"),
            ("nbd+unix:///e?socket=/a&socket=/b", "twice"),
            ("nbd://h/e?socket=/s", "belongs to nbd+unix"),
            ("nbd://h/%zz", "%-escape"),
            ("nbd://h/a%00", "%-escape"),
            ("nbd://h/e#f", "fragment"),
        ];
        for (uri, reason) in cases {
            let error = NbdUri::parse(uri).unwrap_err();
            let text = error.to_string();
            assert!(text.contains(uri) && text.contains(reason), "{uri}: {text}");
        }
    }

    #[test]
    fn prefixes_choose_the_driver() {
        assert!(is_nbd_uri("nbd://h/e") && is_nbd_uri("nbd+unix:///?socket=/s") && is_nbd_uri("nbds://h"));
        assert!(!is_nbd_uri("rbd:pool/img") && !is_nbd_uri("/dev/nbd0"));
    }
}
