//! One client's protocol state (negotiated or not) and the encoding of every message the
//! monitor sends. No I/O: the server feeds it requests and sends the lines it returns.

use super::request::{Rejected, Request};
use super::{Commands, QmpError};
use serde_json::{Map, Value};

/// The QEMU whose QMP schema Tandem emulates (qemu-storage-daemon 10.0's commands).
pub(crate) const QEMU_VERSION: (u64, u64, u64) = (10, 0, 0);

const CAPABILITIES: &str = "qmp_capabilities";
const QUERY_COMMANDS: &str = "query-commands";

/// Messages end in CRLF, as QEMU's monitor writes them.
fn line(json: String) -> String {
    json + "\r\n"
}

fn to_json(value: &Value) -> String {
    // Serialising a Value cannot fail: its map keys are strings.
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

/// The greeting sent on connection; no capabilities (no `oob`) are offered.
pub(crate) fn greeting() -> String {
    line(format!("{{\"QMP\": {{\"version\": {}, \"capabilities\": []}}}}", to_json(&version_json())))
}

/// QEMU's VersionInfo: the QEMU whose QMP we speak, and `package` naming tandemd (what
/// `query-version` returns too).
pub fn version_json() -> serde_json::Value {
    let (major, minor, micro) = QEMU_VERSION;
    let package = format!("tandemd {}", env!("CARGO_PKG_VERSION"));
    serde_json::json!({"qemu": {"micro": micro, "minor": minor, "major": major}, "package": package})
}

/// Keys in QEMU's order ("return" or "error" first, then "id"); `id` verbatim.
fn answer(key: &str, value: &Value, id: Option<&Value>) -> String {
    match id {
        Some(id) => line(format!("{{\"{key}\": {}, \"id\": {}}}", to_json(value), to_json(id))),
        None => line(format!("{{\"{key}\": {}}}", to_json(value))),
    }
}

pub(crate) fn encode_return(value: &Value, id: Option<&Value>) -> String {
    answer("return", value, id)
}

pub(crate) fn encode_error(error: &QmpError, id: Option<&Value>) -> String {
    answer("error", &error.to_json(), id)
}

/// An event; `data` is left out when null, as QEMU does for events without members.
pub(crate) fn encode_event(name: &str, data: &Value, since_epoch: std::time::Duration) -> String {
    let timestamp =
        format!("{{\"seconds\": {}, \"microseconds\": {}}}", since_epoch.as_secs(), since_epoch.subsec_micros());
    let name = to_json(&Value::String(name.into()));
    match data {
        Value::Null => line(format!("{{\"timestamp\": {timestamp}, \"event\": {name}}}")),
        data => line(format!("{{\"timestamp\": {timestamp}, \"event\": {name}, \"data\": {}}}", to_json(data))),
    }
}

/// A client's side of the protocol.
#[derive(Debug, Default)]
pub(crate) struct Session {
    negotiated: bool,
}

impl Session {
    pub(crate) fn negotiated(&self) -> bool {
        self.negotiated
    }

    /// The line answering one framed input.
    pub(crate) fn answer(&mut self, commands: &dyn Commands, input: Result<Request, Rejected>) -> String {
        let request = match input {
            Ok(request) => request,
            Err(rejected) => return encode_error(&rejected.error, rejected.id.as_ref()),
        };
        match self.dispatch(commands, &request.execute, request.arguments) {
            Ok(value) => encode_return(&value, request.id.as_ref()),
            Err(error) => encode_error(&error, request.id.as_ref()),
        }
    }

    fn dispatch(
        &mut self,
        commands: &dyn Commands,
        name: &str,
        arguments: Map<String, Value>,
    ) -> Result<Value, QmpError> {
        if !self.negotiated {
            // Before negotiation only qmp_capabilities exists; QEMU replaces the
            // CommandNotFound text with this hint.
            if name != CAPABILITIES {
                return Err(QmpError::not_found("Expecting capabilities negotiation with 'qmp_capabilities'"));
            }
            check_capabilities(arguments)?;
            self.negotiated = true;
            return Ok(Value::Object(Map::new()));
        }
        match name {
            CAPABILITIES => Err(QmpError::not_found("Capabilities negotiation is already complete, command ignored")),
            QUERY_COMMANDS => {
                no_arguments(arguments)?;
                Ok(query_commands(commands))
            }
            name if commands.names().contains(&name) => run(commands, name, arguments),
            name => Err(QmpError::not_found(format!("The command {name} has not been found"))),
        }
    }
}

/// A handler that panics fails its command, not the client's connection.
fn run(commands: &dyn Commands, name: &str, arguments: Map<String, Value>) -> Result<Value, QmpError> {
    let call = std::panic::AssertUnwindSafe(|| commands.execute(name, arguments));
    std::panic::catch_unwind(call)
        .unwrap_or_else(|_| Err(QmpError::generic(format!("internal error: command {name} panicked"))))
}

fn no_arguments(arguments: Map<String, Value>) -> Result<(), QmpError> {
    match arguments.keys().next() {
        Some(key) => Err(QmpError::generic(format!("Parameter '{key}' is unexpected"))),
        None => Ok(()),
    }
}

/// `enable` may list capabilities, and we offer none: `oob` exists in QEMU but is not offered.
fn check_capabilities(mut arguments: Map<String, Value>) -> Result<(), QmpError> {
    let enable = arguments.remove("enable");
    no_arguments(arguments)?;
    let items = match enable {
        None => return Ok(()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(QmpError::generic("Invalid parameter type for 'enable', expected: array")),
    };
    match items.iter().enumerate().next() {
        None => Ok(()),
        Some((_, Value::String(name))) if name == "oob" => Err(QmpError::generic("Capability 'oob' not available")),
        Some((index, Value::String(name))) => {
            Err(QmpError::generic(format!("Parameter 'enable[{index}]' does not accept value '{name}'")))
        }
        Some((index, _)) => {
            Err(QmpError::generic(format!("Invalid parameter type for 'enable[{index}]', expected: string")))
        }
    }
}

fn query_commands(commands: &dyn Commands) -> Value {
    let mut names = vec![CAPABILITIES, QUERY_COMMANDS];
    names.extend(commands.names().into_iter().filter(|name| *name != CAPABILITIES && *name != QUERY_COMMANDS));
    Value::Array(names.into_iter().map(|name| serde_json::json!({"name": name})).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::request::{requests, Splitter};
    use crate::qmp::ErrorClass;
    use serde_json::json;

    struct Echo;
    impl Commands for Echo {
        fn execute(&self, _: &str, arguments: Map<String, Value>) -> Result<Value, QmpError> {
            Ok(Value::Object(arguments))
        }
        fn names(&self) -> Vec<&'static str> {
            vec!["echo"]
        }
    }

    fn ask(session: &mut Session, input: &str) -> Value {
        let mut found = requests(&mut Splitter::default(), input.as_bytes());
        assert_eq!(found.len(), 1);
        let line = session.answer(&Echo, found.remove(0));
        assert!(line.ends_with("\r\n"));
        serde_json::from_str(&line).unwrap()
    }

    fn class(answer: &Value) -> &str {
        answer["error"]["class"].as_str().unwrap()
    }

    #[test]
    fn negotiation_comes_first_and_once() {
        let mut session = Session::default();
        let answer = ask(&mut session, r#"{"execute": "echo", "id": "a"}"#);
        assert_eq!(class(&answer), ErrorClass::CommandNotFound.wire_name());
        assert_eq!(answer["id"], json!("a"));
        let answer = ask(&mut session, r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#);
        assert_eq!(answer["error"]["desc"], json!("Capability 'oob' not available"));
        let answer = ask(&mut session, r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["xyz"]}}"#);
        assert!(answer["error"]["desc"].as_str().unwrap().contains("'xyz'"));
        assert!(!session.negotiated());
        assert_eq!(
            ask(&mut session, r#"{"execute": "qmp_capabilities", "arguments": {"enable": []}}"#),
            json!({"return": {}})
        );
        assert!(session.negotiated());
        let answer = ask(&mut session, r#"{"execute": "qmp_capabilities"}"#);
        assert_eq!(class(&answer), "CommandNotFound");
        assert_eq!(ask(&mut session, r#"{"execute": "echo", "arguments": {"x": 1}, "id": [1]}"#)["id"], json!([1]));
        assert_eq!(class(&ask(&mut session, r#"{"execute": "nope"}"#)), "CommandNotFound");
        let names = ask(&mut session, r#"{"execute": "query-commands"}"#)["return"].clone();
        assert_eq!(names, json!([{"name": "qmp_capabilities"}, {"name": "query-commands"}, {"name": "echo"}]));
    }

    #[test]
    fn events_leave_data_out_when_null() {
        let second = std::time::Duration::from_micros(1_000_002);
        let event: Value = serde_json::from_str(&encode_event("STOP", &Value::Null, second)).unwrap();
        assert_eq!(event, json!({"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}));
        let greeting: Value = serde_json::from_str(&greeting()).unwrap();
        assert_eq!(greeting["QMP"]["version"]["qemu"]["major"], json!(10));
        assert_eq!(greeting["QMP"]["capabilities"], json!([]));
    }
}
