//! A QMP command's arguments, read by name with QEMU's error texts, so a script that gets an
//! error from qemu-storage-daemon gets the same one here: a missing or mistyped argument, a
//! value an enum does not accept, an argument the command does not have. Every argument must
//! be read; the first one left over is refused by name.

use crate::qmp::QmpError;
use serde_json::{Map, Value};

pub(crate) struct Arguments {
    map: Map<String, Value>,
}

impl Arguments {
    pub(crate) fn new(map: Map<String, Value>) -> Arguments {
        Arguments { map }
    }

    fn mistyped(key: &str, expected: &str) -> QmpError {
        QmpError::generic(format!("Invalid parameter type for '{key}', expected: {expected}"))
    }

    fn missing(key: &str) -> QmpError {
        QmpError::generic(format!("Parameter '{key}' is missing"))
    }

    pub(crate) fn string(&mut self, key: &str) -> Result<Option<String>, QmpError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::String(text)) => Ok(Some(text)),
            Some(_) => Err(Self::mistyped(key, "string")),
        }
    }

    pub(crate) fn required(&mut self, key: &str) -> Result<String, QmpError> {
        self.string(key)?.ok_or_else(|| Self::missing(key))
    }

    pub(crate) fn bool(&mut self, key: &str) -> Result<Option<bool>, QmpError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Bool(flag)) => Ok(Some(flag)),
            Some(_) => Err(Self::mistyped(key, "boolean")),
        }
    }

    /// A non-negative integer (QEMU's `size` and `uint64`; `int` that must not be negative).
    pub(crate) fn u64(&mut self, key: &str) -> Result<Option<u64>, QmpError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Number(number)) => match number.as_u64() {
                Some(value) => Ok(Some(value)),
                None => Err(QmpError::generic(format!("Parameter '{key}' expects a non-negative integer"))),
            },
            Some(_) => Err(Self::mistyped(key, "integer")),
        }
    }

    /// One of `values` (QEMU's enums), by its wire name.
    pub(crate) fn choice(&mut self, key: &str, values: &[&'static str]) -> Result<Option<&'static str>, QmpError> {
        let Some(text) = self.string(key)? else { return Ok(None) };
        match values.iter().find(|v| **v == text) {
            Some(value) => Ok(Some(value)),
            None => Err(QmpError::generic(format!("Parameter '{key}' does not accept value '{text}'"))),
        }
    }

    pub(crate) fn object(&mut self, key: &str) -> Result<Option<Arguments>, QmpError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(Arguments { map })),
            Some(_) => Err(Self::mistyped(key, "object")),
        }
    }

    pub(crate) fn array(&mut self, key: &str) -> Result<Option<Vec<Value>>, QmpError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(_) => Err(Self::mistyped(key, "array")),
        }
    }

    /// Whether `key` was given (and not read yet).
    pub(crate) fn map_has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// Whatever is left, as it came (for the option parsers that read the rest).
    pub(crate) fn into_map(self) -> Map<String, Value> {
        self.map
    }

    /// Every argument was read: the first one left over is refused by name.
    pub(crate) fn finish(self) -> Result<(), QmpError> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(key) => Err(QmpError::generic(format!("Parameter '{key}' is unexpected"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(value: Value) -> Arguments {
        Arguments::new(value.as_object().expect("an object").clone())
    }

    #[test]
    fn errors_use_qemus_words_and_name_the_argument() {
        let mut a = args(json!({"device": 7, "sync": "sideways", "speed": -1, "extra": true}));
        assert_eq!(a.required("job-id").unwrap_err().desc, "Parameter 'job-id' is missing");
        assert_eq!(a.string("device").unwrap_err().desc, "Invalid parameter type for 'device', expected: string");
        let sync = a.choice("sync", &["full", "top"]).unwrap_err().desc;
        assert_eq!(sync, "Parameter 'sync' does not accept value 'sideways'");
        assert!(a.u64("speed").unwrap_err().desc.contains("'speed'"));
        assert_eq!(a.finish().unwrap_err().desc, "Parameter 'extra' is unexpected");
    }

    #[test]
    fn present_values_are_read_and_absent_ones_are_none() {
        let mut a = args(json!({"device": "d", "speed": 5, "force": true, "sync": "top"}));
        assert_eq!(a.required("device").unwrap(), "d");
        assert_eq!(a.u64("speed").unwrap(), Some(5));
        assert_eq!(a.bool("force").unwrap(), Some(true));
        assert_eq!(a.choice("sync", &["full", "top"]).unwrap(), Some("top"));
        assert_eq!(a.string("absent").unwrap(), None);
        a.finish().unwrap();
    }
}
