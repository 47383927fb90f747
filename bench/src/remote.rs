//! NBD exports as bench targets (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`):
//! how they are told from paths, opened, described to fio and to qemu-img. A remote export is
//! never created, laid out or removed by the bench: it exists, and writing it over needs
//! `--overwrite-target` as an existing rbd image does.

use std::path::Path;
use std::sync::Arc;
use tandem::block::BlockDriver;
use tandem::reactor::RuntimeHandle;
use tandem_drivers::nbd::{is_nbd_uri, open_uri, Endpoint, NbdConfig, NbdDriver, NbdError, NbdUri};

/// The URI `path` spells, if it is an NBD one.
pub fn nbd_uri(path: &Path) -> Option<&str> {
    path.to_str().filter(|text| is_nbd_uri(text))
}

/// Open an export for the bench: read-only unless the caller writes it.
pub fn open(runtime: &RuntimeHandle, uri: &str, read_only: bool) -> Result<NbdDriver, NbdError> {
    open_uri(runtime, uri, &NbdConfig { read_only, ..NbdConfig::default() })
}

/// Open an export as a job's target (mirror, backup).
pub fn open_target(runtime: &RuntimeHandle, uri: &str) -> Result<Arc<dyn BlockDriver>, String> {
    Ok(Arc::new(open(runtime, uri, false).map_err(|e| e.to_string())?))
}

/// QEMU's `--image-opts` for the first `size_bytes` of the export, read raw (qemu-img compare).
pub fn qemu_image_opts(uri: &str, size_bytes: u64) -> Result<String, String> {
    let parsed = NbdUri::parse(uri).map_err(|e| e.to_string())?;
    let comma = |text: &str| text.replace(',', ",,");
    let server = match &parsed.endpoint {
        Endpoint::Unix { path } => format!("file.server.type=unix,file.server.path={}", comma(&path.to_string_lossy())),
        Endpoint::Tcp { host, port } => {
            format!("file.server.type=inet,file.server.host={},file.server.port={port}", comma(host))
        }
    };
    Ok(format!("driver=raw,size={size_bytes},file.driver=nbd,{server},file.export={}", comma(&parsed.export)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_sees_the_same_export() {
        let opts = qemu_image_opts("nbd+unix:///disk?socket=/run/a,b.sock", 1 << 20).unwrap();
        assert_eq!(
            opts,
            "driver=raw,size=1048576,file.driver=nbd,file.server.type=unix,file.server.path=/run/a,,b.sock,file.export=disk"
        );
        let opts = qemu_image_opts("nbd://h:99/", 512).unwrap();
        assert!(opts.contains("file.server.host=h,file.server.port=99,file.export="), "{opts}");
        assert!(nbd_uri(Path::new("nbd://h/e")).is_some() && nbd_uri(Path::new("/dev/nbd0")).is_none());
    }
}
