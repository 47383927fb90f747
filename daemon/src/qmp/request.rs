//! The pure half of the QMP monitor: bytes in, requests or errors out, no I/O, so the server
//! and the fuzzer (`fuzz/fuzz_targets/qmp_parser.rs`) run the same code.
//!
//! QEMU's JSON lexer reads a stream of values, not lines: several requests may share a read
//! and one may span reads. [`Splitter`] only frames: it finds where a top-level value ends by
//! counting brackets outside strings, as QEMU's streamer does, and serde_json parses each
//! framed value. Framing first bounds memory (a value over [`MAX_REQUEST_BYTES`] or deeper than
//! [`MAX_DEPTH`] is refused while it arrives, never buffered whole) and lets a bad value be
//! skipped: after a framing error the splitter drops input up to the next newline, control
//! character or 0xFE/0xFF byte (QEMU's resynchronisation points a client can force), while a
//! value that frames but does not parse costs only itself.

use super::QmpError;
use serde_json::{Map, Value};

/// The largest request accepted, in bytes; a client sending more gets an error, not our memory.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// The deepest nesting of objects and arrays accepted; serde_json's own limit is 128.
pub const MAX_DEPTH: usize = 64;

/// One validated request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub execute: String,
    pub arguments: Map<String, Value>,
    /// Echoed verbatim in the answer; any JSON value.
    pub id: Option<Value>,
}

/// A request refused before dispatch, with the `id` to echo when the input was an object.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub error: QmpError,
    pub id: Option<Value>,
}

impl Rejected {
    fn generic(desc: impl Into<String>) -> Rejected {
        Rejected { error: QmpError::generic(desc), id: None }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between values.
    Idle,
    /// Inside an object or array at `depth` >= 1, outside strings.
    Nested,
    /// Inside a string (of a nested value, or a top-level string when `depth` is 0).
    InString,
    /// After a backslash inside a string.
    Escape,
    /// A top-level scalar (number, keyword or garbage), ended by whitespace or a delimiter.
    Bare,
    /// Dropping input after a framing error until a resynchronisation point.
    Recovery,
}

/// Splits a byte stream into top-level JSON values (see the module's documentation).
#[derive(Debug)]
pub struct Splitter {
    state: State,
    depth: usize,
    current: Vec<u8>,
}

impl Default for Splitter {
    fn default() -> Self {
        Splitter { state: State::Idle, depth: 0, current: Vec::new() }
    }
}

/// What the splitter found: a framed value's bytes or a framing error.
pub type Frame = Result<Vec<u8>, Rejected>;

fn is_space(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\r' | b'\n')
}

/// Where QEMU's lexer leaves its recovery state (see qmp-spec.rst on resynchronisation).
fn resynchronises(byte: u8) -> bool {
    (byte < 0x20 && byte != b'\t') || byte >= 0xFE
}

impl Splitter {
    /// Feed `input`; returns the values (and errors) it completed, in order.
    pub fn feed(&mut self, input: &[u8]) -> Vec<Frame> {
        let mut frames = Vec::new();
        let mut index = 0;
        while index < input.len() {
            let byte = input[index];
            // A bare scalar ends before its delimiter, which is then read afresh in Idle.
            if self.state == State::Bare && (is_space(byte) || b"{}[],:\"".contains(&byte)) {
                frames.push(Ok(self.take()));
                continue;
            }
            index += 1;
            if let Some(frame) = self.step(byte) {
                frames.push(frame);
            }
            assert!(self.current.len() <= MAX_REQUEST_BYTES, "the splitter kept more than its bound");
            assert!(self.depth <= MAX_DEPTH, "the splitter nested deeper than its bound");
        }
        frames
    }

    /// Whether a value is partly read (the connection closing now would cut it).
    pub fn is_mid_value(&self) -> bool {
        !matches!(self.state, State::Idle | State::Recovery)
    }

    fn take(&mut self) -> Vec<u8> {
        self.state = State::Idle;
        self.depth = 0;
        std::mem::take(&mut self.current)
    }

    /// Drop the value under way and skip to the next resynchronisation point.
    fn fail(&mut self, desc: String, byte: u8) -> Option<Frame> {
        self.current = Vec::new();
        self.depth = 0;
        // The offending byte may itself be the resynchronisation point (a newline in a string).
        self.state = if resynchronises(byte) { State::Idle } else { State::Recovery };
        Some(Err(Rejected::generic(desc)))
    }

    fn step(&mut self, byte: u8) -> Option<Frame> {
        match self.state {
            State::Recovery => {
                if resynchronises(byte) {
                    self.state = State::Idle;
                }
                return None;
            }
            // Stray control bytes between values are how a client forces resynchronisation.
            State::Idle if is_space(byte) || resynchronises(byte) => return None,
            _ => {}
        }
        let in_string = matches!(self.state, State::InString | State::Escape);
        if (in_string && byte < 0x20) || (resynchronises(byte) && !is_space(byte)) {
            let place = if in_string { " in a string" } else { "" };
            return self.fail(format!("JSON parse error, invalid byte 0x{byte:02x}{place}"), byte);
        }
        if self.current.len() == MAX_REQUEST_BYTES {
            let desc = format!("JSON token size limit exceeded: a request is at most {MAX_REQUEST_BYTES} bytes");
            return self.fail(desc, byte);
        }
        self.current.push(byte);
        match self.state {
            State::Idle => self.start(byte),
            State::Nested => self.nested(byte),
            State::InString => self.string(byte),
            State::Escape => {
                self.state = State::InString;
                None
            }
            State::Bare | State::Recovery => None,
        }
    }

    fn start(&mut self, byte: u8) -> Option<Frame> {
        match byte {
            b'{' | b'[' => {
                self.depth = 1;
                self.state = State::Nested;
                None
            }
            b'"' => {
                self.state = State::InString;
                None
            }
            // A stray delimiter is a value of its own that serde_json will refuse.
            b'}' | b']' | b',' | b':' => Some(Ok(self.take())),
            _ => {
                self.state = State::Bare;
                None
            }
        }
    }

    fn nested(&mut self, byte: u8) -> Option<Frame> {
        match byte {
            b'"' => self.state = State::InString,
            b'{' | b'[' if self.depth == MAX_DEPTH => {
                return self.fail(format!("JSON nesting depth limit exceeded: at most {MAX_DEPTH} levels"), byte);
            }
            b'{' | b'[' => self.depth += 1,
            b'}' | b']' => {
                // The kinds of brackets are not matched here: a mismatch frames, then fails to parse.
                self.depth -= 1;
                if self.depth == 0 {
                    return Some(Ok(self.take()));
                }
            }
            _ => {}
        }
        None
    }

    fn string(&mut self, byte: u8) -> Option<Frame> {
        match byte {
            b'\\' => self.state = State::Escape,
            b'"' if self.depth == 0 => return Some(Ok(self.take())),
            b'"' => self.state = State::Nested,
            _ => {}
        }
        None
    }
}

/// Parse and check one framed value as QEMU's qmp_dispatch does.
pub fn parse(frame: &[u8]) -> Result<Request, Rejected> {
    let value: Value =
        serde_json::from_slice(frame).map_err(|e| Rejected::generic(format!("JSON parse error, {e}")))?;
    let Value::Object(mut object) = value else {
        return Err(Rejected::generic("QMP input must be a JSON object"));
    };
    let id = object.remove("id");
    check(object).map_err(|error| Rejected { error, id: id.clone() }).map(|(execute, arguments)| Request {
        execute,
        arguments,
        id,
    })
}

/// The members of a request other than `id`: `execute` and optional `arguments`, nothing else.
fn check(object: Map<String, Value>) -> Result<(String, Map<String, Value>), QmpError> {
    let mut execute = None;
    let mut arguments = Map::new();
    for (key, value) in object {
        match (key.as_str(), value) {
            ("execute", Value::String(name)) => execute = Some(name),
            ("execute", _) => return Err(QmpError::generic("QMP input member 'execute' must be a string")),
            ("arguments", Value::Object(map)) => arguments = map,
            ("arguments", _) => return Err(QmpError::generic("QMP input member 'arguments' must be an object")),
            // Out-of-band execution is only known once negotiated, and we never offer it.
            (_, _) => return Err(QmpError::generic(format!("QMP input member '{key}' is unexpected"))),
        }
    }
    let execute = execute.ok_or_else(|| QmpError::generic("QMP input lacks member 'execute'"))?;
    Ok((execute, arguments))
}

/// Frame `input` with `splitter` and parse each value: the whole pure path, as the server runs it.
pub fn requests(splitter: &mut Splitter, input: &[u8]) -> Vec<Result<Request, Rejected>> {
    splitter.feed(input).into_iter().map(|frame| frame.and_then(|bytes| parse(&bytes))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::ErrorClass;
    use serde_json::json;

    fn all(input: &[u8]) -> Vec<Result<Request, Rejected>> {
        requests(&mut Splitter::default(), input)
    }

    fn desc(result: &Result<Request, Rejected>) -> &str {
        &result.as_ref().unwrap_err().error.desc
    }

    #[test]
    fn two_requests_in_one_input_and_one_split_in_two() {
        let found = all(br#"{"execute":"a"}{"execute":"b","id":1}"#);
        assert_eq!(found.len(), 2);
        assert_eq!(found[1].as_ref().unwrap().id, Some(json!(1)));
        let mut splitter = Splitter::default();
        assert!(requests(&mut splitter, br#"{"execute": "x", "arguments": {"s": "}{\""#).is_empty());
        assert!(splitter.is_mid_value());
        let found = requests(&mut splitter, br#"x"}}"#);
        assert_eq!(found[0].as_ref().unwrap().arguments["s"], json!("}{\"x"));
    }

    #[test]
    fn bad_json_then_good_request_resynchronises() {
        let found = all(b"{\"execute\": tru}\n{\"execute\": \"b\"}");
        assert!(desc(&found[0]).starts_with("JSON parse error"), "{found:?}");
        assert_eq!(found[1].as_ref().unwrap().execute, "b");
        // A missing quote: the newline in the string ends the bad value.
        let found = all(b"{\"execute\": \"a\n{\"execute\": \"b\"}");
        assert!(desc(&found[0]).contains("invalid byte 0x0a in a string"), "{found:?}");
        assert_eq!(found[1].as_ref().unwrap().execute, "b");
    }

    #[test]
    fn scalars_and_stray_delimiters_are_refused() {
        let found = all(b"42 \"s\" true ] [1]\n");
        let descs: Vec<&str> = found.iter().map(desc).collect();
        assert_eq!(descs[0], "QMP input must be a JSON object");
        assert_eq!(descs[1], "QMP input must be a JSON object");
        assert_eq!(descs[2], "QMP input must be a JSON object");
        assert!(descs[3].starts_with("JSON parse error"));
        assert_eq!(descs[4], "QMP input must be a JSON object");
    }

    #[test]
    fn members_are_checked_with_qemus_texts() {
        let cases: [(&[u8], &str); 5] = [
            (br#"{"id": 7}"#, "QMP input lacks member 'execute'"),
            (br#"{"execute": 1}"#, "QMP input member 'execute' must be a string"),
            (br#"{"execute": "a", "arguments": []}"#, "QMP input member 'arguments' must be an object"),
            (br#"{"execute": "a", "x": 1}"#, "QMP input member 'x' is unexpected"),
            (br#"{"exec-oob": "a"}"#, "QMP input member 'exec-oob' is unexpected"),
        ];
        for (input, text) in cases {
            let found = all(input);
            assert_eq!(desc(&found[0]), text);
            assert_eq!(found[0].as_ref().unwrap_err().error.class, ErrorClass::GenericError);
        }
        assert_eq!(all(br#"{"id": 7}"#)[0].as_ref().unwrap_err().id, Some(json!(7)));
    }

    #[test]
    fn size_and_depth_are_bounded_and_the_stream_goes_on() {
        let deep = format!("{}\n{{\"execute\": \"ok\"}}", "[".repeat(MAX_DEPTH + 1));
        let found = all(deep.as_bytes());
        assert!(desc(&found[0]).contains("nesting depth"), "{found:?}");
        assert_eq!(found[1].as_ref().unwrap().execute, "ok");
        let within = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert_eq!(desc(&all(within.as_bytes())[0]), "QMP input must be a JSON object");

        let mut splitter = Splitter::default();
        let chunk = vec![b' '; 64 << 10];
        assert!(requests(&mut splitter, b"{\"execute\": \"x\", \"pad\": \"").is_empty());
        let mut errors = 0;
        for _ in 0..20 {
            errors += requests(&mut splitter, &chunk).len();
            assert!(splitter.current.len() <= MAX_REQUEST_BYTES);
        }
        assert_eq!(errors, 1);
        let found = requests(&mut splitter, b"\"}\n{\"execute\": \"after\"}");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].as_ref().unwrap().execute, "after");
    }

    #[test]
    fn forced_resynchronisation_with_0xff() {
        let found = all(b"{\"execute\": \"a\", \xff{\"execute\": \"b\"}");
        assert!(desc(&found[0]).starts_with("JSON parse error"), "{found:?}");
        assert_eq!(found.last().unwrap().as_ref().unwrap().execute, "b");
    }
}
