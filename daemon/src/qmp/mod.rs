//! PLACEHOLDER until the monitor lands (branch i18-qmp): the interface the handlers use.

use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotActive,
    DeviceNotFound,
    KvmMissingCap,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    pub fn generic(desc: impl Into<String>) -> QmpError {
        QmpError { class: ErrorClass::GenericError, desc: desc.into() }
    }
}

pub trait Commands: Send + Sync + 'static {
    fn execute(&self, name: &str, arguments: Map<String, Value>) -> Result<Value, QmpError>;
    fn names(&self) -> Vec<&'static str>;
}

#[derive(Clone)]
pub struct EventSender;

impl EventSender {
    pub fn emit(&self, _name: &str, _data: Value) {}
}

pub fn version_json() -> Value {
    serde_json::json!({})
}
