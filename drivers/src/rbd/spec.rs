//! An RBD image's address, parsed from QEMU's spelling so the strings users already have work:
//! `rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:conf=PATH][:id=USER][:KEY=VALUE...]`. A backslash
//! takes the next character literally (`\:` or `\@` inside a name); any other `KEY=VALUE` is
//! a librados option (`mon_host`, `keyring`, `rados_osd_op_timeout`...), set before connecting.

use super::RbdError;
use std::path::PathBuf;

/// Where an image is and how to reach its cluster.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RbdSpec {
    pub pool: String,
    /// The RADOS namespace inside the pool (none: the default namespace).
    pub namespace: Option<String>,
    pub image: String,
    /// A snapshot opens read-only.
    pub snapshot: Option<String>,
    /// The ceph.conf to read (none: librados' own search: `$CEPH_CONF`, `/etc/ceph/ceph.conf`...).
    pub conf_path: Option<PathBuf>,
    /// The cephx user without its `client.` prefix (none: `admin`).
    pub user: Option<String>,
    /// librados options, set in this order after the conf file is read.
    pub options: Vec<(String, String)>,
}

impl RbdSpec {
    /// Parse QEMU's `rbd:` filename.
    ///
    /// ```
    /// use tandem_drivers::rbd::RbdSpec;
    /// let spec = RbdSpec::parse("rbd:vms/disk1@nightly:conf=/etc/ceph/ceph.conf:id=backup").unwrap();
    /// assert_eq!((spec.pool.as_str(), spec.image.as_str()), ("vms", "disk1"));
    /// assert_eq!(spec.snapshot.as_deref(), Some("nightly"));
    /// assert_eq!(spec.user.as_deref(), Some("backup"));
    /// ```
    pub fn parse(text: &str) -> Result<RbdSpec, RbdError> {
        // The name part only: the options may hold a secret (`key=`).
        let shown = text.split(':').take(2).collect::<Vec<_>>().join(":");
        let bad = |reason: &'static str| RbdError::Spec { spec: shown.clone(), reason };
        let rest = text.strip_prefix("rbd:").ok_or_else(|| bad("it does not start with rbd:"))?;
        let fields = split_unescaped(rest, ':').map_err(bad)?;
        let (name, options) = fields.split_first().expect("split yields at least one field");
        let mut spec = parse_name(name).map_err(bad)?;
        for option in options {
            let halves: Vec<String> = split_unescaped(option, '=').map_err(bad)?.iter().map(|h| unescape(h)).collect();
            let (key, value) = (halves[0].as_str(), halves[1..].join("="));
            if halves.len() < 2 {
                let reason = "an option is KEY=VALUE".to_string();
                return Err(RbdError::Option { key: key.to_string(), value: redact(key, &value), reason });
            }
            let value = value.as_str();
            if key.is_empty() || value.is_empty() {
                let reason = "neither the key nor the value may be empty".to_string();
                return Err(RbdError::Option { key: key.to_string(), value: redact(key, value), reason });
            }
            match key {
                "conf" => spec.conf_path = Some(PathBuf::from(value)),
                "id" => spec.user = Some(value.strip_prefix("client.").unwrap_or(value).to_string()),
                _ => spec.options.push((key.to_string(), value.to_string())),
            }
        }
        Ok(spec)
    }

    /// The spec back in QEMU's spelling (options included, escaped as needed).
    pub fn to_qemu_string(&self) -> String {
        let mut text = format!("rbd:{}", escape(&self.pool));
        if let Some(namespace) = &self.namespace {
            text += &format!("/{}", escape(namespace));
        }
        text += &format!("/{}", escape(&self.image));
        if let Some(snapshot) = &self.snapshot {
            text += &format!("@{}", escape(snapshot));
        }
        if let Some(conf) = &self.conf_path {
            text += &format!(":conf={}", escape(&conf.to_string_lossy()));
        }
        if let Some(user) = &self.user {
            text += &format!(":id={}", escape(user));
        }
        for (key, value) in &self.options {
            text += &format!(":{}={}", escape(key), escape(value));
        }
        text
    }

    /// `POOL[/NAMESPACE]/IMAGE[@SNAP]`, for messages.
    pub fn image_path(&self) -> String {
        let mut text = self.pool.clone();
        if let Some(namespace) = &self.namespace {
            text += &format!("/{namespace}");
        }
        text += &format!("/{}", self.image);
        if let Some(snapshot) = &self.snapshot {
            text += &format!("@{snapshot}");
        }
        text
    }
}

/// `POOL[/NAMESPACE]/IMAGE[@SNAP]`.
fn parse_name(name: &str) -> Result<RbdSpec, &'static str> {
    let (path, snapshot) = match split_unescaped(name, '@')?.as_slice() {
        [path] => (path.clone(), None),
        [path, snapshot] if !snapshot.is_empty() => (path.clone(), Some(unescape(snapshot))),
        [_, _] => return Err("the snapshot name after @ is empty"),
        _ => return Err("more than one @"),
    };
    let parts: Vec<String> = split_unescaped(&path, '/')?.iter().map(|part| unescape(part)).collect();
    let (pool, namespace, image) = match parts.as_slice() {
        [pool, image] => (pool, None, image),
        [pool, namespace, image] => (pool, Some(namespace.clone()), image),
        [_] => return Err("no pool: the name is POOL/IMAGE"),
        _ => return Err("too many /: the name is POOL[/NAMESPACE]/IMAGE"),
    };
    if pool.is_empty() || image.is_empty() || namespace.as_deref() == Some("") {
        return Err("the pool, namespace and image names may not be empty");
    }
    Ok(RbdSpec { pool: pool.clone(), namespace, image: image.clone(), snapshot, ..RbdSpec::default() })
}

/// Split at every `separator` not preceded by a backslash. The escape of a separator is
/// consumed; every other escape stays for the next level (a `\@` inside a `:` field), and
/// [`unescape`] removes what is left at the last.
fn split_unescaped(text: &str, separator: char) -> Result<Vec<String>, &'static str> {
    let mut parts = vec![String::new()];
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        let part = parts.last_mut().expect("never empty");
        match c {
            '\\' => {
                let escaped = chars.next().ok_or("a trailing backslash escapes nothing")?;
                if escaped != separator {
                    part.push('\\');
                }
                part.push(escaped);
            }
            c if c == separator => parts.push(String::new()),
            c => part.push(c),
        }
    }
    Ok(parts)
}

/// Drop the escapes left after the last split (`\\` is a backslash).
fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    out
}

/// An option's value as errors show it: a secret's is hidden.
pub(crate) fn redact(key: &str, value: &str) -> String {
    match key == "key" || key.contains("secret") || key.contains("password") {
        true => "(hidden)".to_string(),
        false => value.to_string(),
    }
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, ':' | '@' | '/' | '\\' | '=') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_spellings_parse() {
        let spec = RbdSpec::parse("rbd:rbd/tandem").unwrap();
        assert_eq!(spec, RbdSpec { pool: "rbd".into(), image: "tandem".into(), ..RbdSpec::default() });
        let spec =
            RbdSpec::parse("rbd:pool/ns/img@snap:conf=/tmp/c/ceph.conf:id=client.bk:rados_osd_op_timeout=5").unwrap();
        assert_eq!(spec.namespace.as_deref(), Some("ns"));
        assert_eq!(spec.snapshot.as_deref(), Some("snap"));
        assert_eq!(spec.conf_path, Some(PathBuf::from("/tmp/c/ceph.conf")));
        assert_eq!(spec.user.as_deref(), Some("bk"), "client. is librados' prefix, not the user's");
        assert_eq!(spec.options, vec![("rados_osd_op_timeout".to_string(), "5".to_string())]);
    }

    #[test]
    fn escapes_keep_separators_inside_names() {
        let spec = RbdSpec::parse(r"rbd:p/a\:b\@c:mon_host=127.0.0.1\:6789").unwrap();
        assert_eq!(spec.image, "a:b@c");
        assert_eq!(spec.snapshot, None);
        assert_eq!(spec.options, vec![("mon_host".to_string(), "127.0.0.1:6789".to_string())]);
        assert_eq!(RbdSpec::parse(&spec.to_qemu_string()).unwrap(), spec, "round trip");
    }

    #[test]
    fn bad_specs_are_named() {
        for (text, words) in [
            ("file:/x", "rbd:"),
            ("rbd:image", "no pool"),
            ("rbd:/image", "empty"),
            ("rbd:pool/", "empty"),
            ("rbd:a/b/c/d", "too many"),
            ("rbd:p/i@", "snapshot"),
            ("rbd:p/i@a@b", "more than one @"),
            (r"rbd:p/i\", "backslash"),
        ] {
            let error = RbdSpec::parse(text).unwrap_err();
            let message = error.to_string();
            assert!(message.contains(text) && message.contains(words), "{text}: {message}");
        }
        let error = RbdSpec::parse("rbd:p/i:conf").unwrap_err();
        assert!(matches!(&error, RbdError::Option { key, .. } if key == "conf"), "{error}");
        let error = RbdSpec::parse("rbd:p/i:id=").unwrap_err();
        assert!(matches!(&error, RbdError::Option { key, .. } if key == "id"), "{error}");
    }
}
