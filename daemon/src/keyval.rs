//! QEMU's two spellings of a structured option, turned into one JSON tree so the rest of the
//! daemon reads both the same way: `key=value,...` ("keyval": dotted keys nest, `,,` is a
//! comma inside a value, every value is a string) or a JSON object when the text starts with
//! `{` (values keep their JSON types). Semantics follow QEMU's `util/keyval.c` for the parts
//! its users write; nothing here is copied from it.

use serde_json::{Map, Value};

/// A malformed option, naming the text at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyvalError {
    #[error("'{text}': {reason}")]
    Syntax { text: String, reason: &'static str },
    #[error("'{text}': key '{key}' is given twice")]
    Duplicate { text: String, key: String },
    #[error("'{text}': not valid JSON: {reason}")]
    Json { text: String, reason: String },
}

/// Parse `text` as a JSON object or as keyval.
pub fn parse(text: &str) -> Result<Map<String, Value>, KeyvalError> {
    if text.trim_start().starts_with('{') {
        return match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(_) => Err(KeyvalError::Syntax { text: text.into(), reason: "JSON must be an object" }),
            Err(e) => Err(KeyvalError::Json { text: text.into(), reason: e.to_string() }),
        };
    }
    let mut root = Map::new();
    for (key, value) in split_pairs(text)? {
        insert(&mut root, text, &key, value)?;
    }
    Ok(root)
}

/// `a=1,b.c=x,,y` into [("a","1"), ("b.c","x,y")].
fn split_pairs(text: &str) -> Result<Vec<(String, String)>, KeyvalError> {
    let syntax = |reason| KeyvalError::Syntax { text: text.into(), reason };
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    while chars.peek().is_some() {
        let mut key = String::new();
        let mut found_equals = false;
        for c in chars.by_ref() {
            if c == '=' {
                found_equals = true;
                break;
            }
            key.push(c);
        }
        if !found_equals || key.is_empty() || key.contains(',') {
            return Err(syntax("expected KEY=VALUE pairs separated by commas"));
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match (c, chars.peek()) {
                (',', Some(',')) => {
                    chars.next();
                    value.push(',');
                }
                (',', _) => break,
                (c, _) => value.push(c),
            }
        }
        pairs.push((key, value));
    }
    if pairs.is_empty() {
        return Err(syntax("empty option"));
    }
    Ok(pairs)
}

fn insert(root: &mut Map<String, Value>, text: &str, key: &str, value: String) -> Result<(), KeyvalError> {
    let syntax = |reason| KeyvalError::Syntax { text: text.into(), reason };
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(syntax("a key has an empty part"));
    }
    let (last, path) = parts.split_last().expect("split gives one part at least");
    let mut map = root;
    for part in path {
        let entry = map.entry(part.to_string()).or_insert_with(|| Value::Object(Map::new()));
        map = match entry {
            Value::Object(inner) => inner,
            _ => return Err(KeyvalError::Duplicate { text: text.into(), key: key.into() }),
        };
    }
    if map.insert(last.to_string(), Value::String(value)).is_some() {
        return Err(KeyvalError::Duplicate { text: text.into(), key: key.into() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keyval_nests_dotted_keys_and_unescapes_commas() {
        let parsed = parse("driver=file,node-name=f,filename=/a,,b.img,cache.direct=on").unwrap();
        let expected = json!({"driver": "file", "node-name": "f", "filename": "/a,b.img", "cache": {"direct": "on"}});
        assert_eq!(Value::Object(parsed), expected);
    }

    #[test]
    fn json_is_taken_as_is() {
        let parsed = parse(r#"{"driver":"raw","file":"f","read-only":true}"#).unwrap();
        assert_eq!(parsed["read-only"], json!(true));
    }

    #[test]
    fn bad_text_is_named() {
        assert!(matches!(parse("driver=file,driver=raw"), Err(KeyvalError::Duplicate { key, .. }) if key == "driver"));
        assert!(matches!(parse("novalue"), Err(KeyvalError::Syntax { .. })));
        assert!(matches!(parse("a..b=1"), Err(KeyvalError::Syntax { .. })));
        assert!(matches!(parse("a=1,a.b=2"), Err(KeyvalError::Duplicate { .. })));
        assert!(matches!(parse("{\"a\":"), Err(KeyvalError::Json { .. })));
        assert!(matches!(parse("[1]"), Err(KeyvalError::Syntax { .. })));
    }
}
