//! [`NbdError`]: why an NBD disk could not be opened, each naming the URI (or export) and the
//! cause. Failures of single requests are `tandem::Error::Io` with the errno the server sent
//! (or ETIMEDOUT for a deadline, ENOTCONN for a dead connection), as every driver reports them.

use super::super::uri::UriError;
use tandem::error::errno_text;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NbdError {
    #[error(transparent)]
    Uri(#[from] UriError),
    #[error("bad NBD option {key}={value}: {reason}")]
    Config { key: &'static str, value: String, reason: &'static str },
    #[error("cannot connect to the NBD server at {target}: {}", errno_text(*.errno))]
    Connect { target: String, errno: i32 },
    #[error("NBD handshake with {target} failed: {reason}")]
    Handshake { target: String, reason: String },
    #[error("the NBD server at {target} refused export {export:?} ({option}: {reply}){}", message_suffix(.message))]
    Refused { target: String, export: String, option: &'static str, reply: String, message: String },
    #[error("after reconnecting, the NBD export {target} changed: {what}")]
    Changed { target: String, what: String },
    #[error("cannot start the NBD client's {what}: {detail}")]
    Start { what: &'static str, detail: String },
}

fn message_suffix(message: &str) -> String {
    match message.is_empty() {
        true => String::new(),
        false => format!(": {message}"),
    }
}
