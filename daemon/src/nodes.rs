//! The daemon's catalog of block nodes by node-name, built from `--blockdev` options in the
//! order given (a `raw` node names a node defined before it, as in QEMU). Opening never
//! creates or resizes anything: a missing file is an error that names it.
//!
//! Persistent dirty bitmaps (QEMU keeps them in a qcow2 image; ours sit beside a raw image)
//! are sidecar files named `IMAGE.NAME.bitmap` next to a file node's image. Opening the node
//! loads every one and records into it; one its process left in use loads as inconsistent
//! (said in a log line) and is kept so until a backup's fallback or a removal. Closing the
//! node (blockdev-del, the daemon's stop) saves them with the flag cleared.

use crate::options::{BlockdevSpec, DriverSpec};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tandem::bitmap::RecordingBitmap;
use tandem::block::Disk;
use tandem::reactor::RuntimeHandle;
use tandem_drivers::{FileDriver, FileOptions, NullDriver};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("--blockdev node-name={name}: a node with this name already exists")]
    Duplicate { name: String },
    #[error("--blockdev node-name={name}: file={file}: no node named '{file}' (define it first)")]
    NoSuchFile { name: String, file: String },
    #[error("--blockdev node-name={name}: {source}")]
    Open { name: String, source: tandem::Error },
    #[error("node '{name}' not found")]
    NotFound { name: String },
    #[error("node '{name}' is in use by {user}")]
    InUse { name: String, user: String },
    #[error("node '{name}': persistent bitmap '{bitmap}': {reason}")]
    Bitmap { name: String, bitmap: String, reason: String },
}

/// One node: the disk guests and exports use, and how it was opened.
pub struct Node {
    pub disk: Disk,
    pub driver: &'static str,
    pub read_only: bool,
    /// Trims and zeroing may deallocate (`discard=unmap`).
    pub unmap: bool,
    /// What it was opened on: the file's path (file), the node below (raw).
    pub file: Option<String>,
    /// Opened with O_DIRECT (`cache.direct=on`).
    pub direct: bool,
    /// A file node's persistent bitmaps, being recorded into.
    pub recordings: Vec<RecordingBitmap>,
}

/// The sidecar of bitmap `name` beside `image`.
pub fn sidecar_path(image: &Path, name: &str) -> PathBuf {
    let mut file_name = image.file_name().unwrap_or_default().to_os_string();
    file_name.push(format!(".{name}.bitmap"));
    image.with_file_name(file_name)
}

/// A bitmap name that makes a sidecar file name: no path separator, no NUL, not empty.
pub fn sidecar_name_ok(name: &str) -> bool {
    !name.is_empty() && !name.contains(['/', '\0'])
}

/// The sidecars beside `image`, by bitmap name (the part between the image's name and
/// `.bitmap`).
fn sidecars(image: &Path) -> Vec<(String, PathBuf)> {
    let (Some(dir), Some(base)) = (image.parent(), image.file_name().and_then(|n| n.to_str())) else {
        return Vec::new();
    };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let prefix = format!("{base}.");
    let mut found: Vec<(String, PathBuf)> = entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let file_name = entry.file_name().into_string().ok()?;
            let name = file_name.strip_prefix(&prefix)?.strip_suffix(".bitmap")?.to_string();
            sidecar_name_ok(&name).then(|| (name, entry.path()))
        })
        .collect();
    found.sort();
    found
}

impl Node {
    /// Load and record every sidecar beside `image` into this node's disk.
    fn load_bitmaps(&mut self, node_name: &str, image: &Path) -> Result<(), NodeError> {
        for (name, path) in sidecars(image) {
            let bad = |reason: String| NodeError::Bitmap { name: node_name.to_string(), bitmap: name.clone(), reason };
            let recording = tandem::bitmap::open_for_recording_any(&path).map_err(|e| bad(e.to_string()))?;
            if recording.name() != name {
                return Err(bad(format!("{} holds bitmap '{}'", path.display(), recording.name())));
            }
            self.disk.bitmaps().add_shared(&name, recording.bitmap().clone()).map_err(|e| bad(e.to_string()))?;
            if recording.bitmap().is_inconsistent() {
                tandem::log::line(&format!(
                    "node {node_name}: persistent bitmap '{name}' loaded as inconsistent: its process stopped while \
                     recording it ({}); back up with on-inconsistent-bitmap=full or remove it",
                    path.display()
                ));
            }
            self.recordings.push(recording);
        }
        Ok(())
    }

    /// Save the persistent bitmaps, in-use flag cleared (kept while inconsistent).
    pub fn close_bitmaps(&mut self, node_name: &str) {
        for recording in self.recordings.drain(..) {
            let name = recording.name().to_string();
            if let Err(error) = recording.close() {
                tandem::log::line(&format!("node {node_name}: saving persistent bitmap '{name}' failed: {error}"));
            }
        }
    }
}

#[derive(Default)]
pub struct Catalog {
    nodes: BTreeMap<String, Node>,
}

impl Catalog {
    /// Open `spec` and add it. Nothing is added on an error.
    pub fn add(&mut self, runtime: &RuntimeHandle, spec: &BlockdevSpec) -> Result<&Node, NodeError> {
        let name = spec.node_name.clone();
        if self.nodes.contains_key(&name) {
            return Err(NodeError::Duplicate { name });
        }
        let open_error = |source| NodeError::Open { name: name.clone(), source };
        let node = match &spec.driver {
            DriverSpec::File { filename, direct } => {
                let options = FileOptions { read_only: spec.read_only, buffered: !direct, ..FileOptions::default() };
                let driver = FileDriver::open(runtime, filename, &options).map_err(open_error)?;
                let mut node = Node {
                    disk: Disk::new(Arc::new(driver)),
                    driver: "file",
                    read_only: spec.read_only,
                    unmap: spec.unmap,
                    file: Some(filename.display().to_string()),
                    direct: *direct,
                    recordings: Vec::new(),
                };
                if !spec.read_only {
                    node.load_bitmaps(&name, filename)?;
                }
                node
            }
            DriverSpec::Raw { file } => {
                let below = self
                    .nodes
                    .get(file)
                    .ok_or_else(|| NodeError::NoSuchFile { name: name.clone(), file: file.clone() })?;
                // raw over a node is the node's bytes as they are: the same disk, so a bitmap or
                // job on either sees every write.
                Node {
                    disk: below.disk.clone(),
                    driver: "raw",
                    read_only: spec.read_only || below.read_only,
                    unmap: spec.unmap && below.unmap,
                    file: Some(file.clone()),
                    direct: below.direct,
                    recordings: Vec::new(),
                }
            }
            DriverSpec::NullCo { size_bytes } => Node {
                disk: Disk::new(Arc::new(NullDriver::new(*size_bytes))),
                driver: "null-co",
                read_only: spec.read_only,
                unmap: spec.unmap,
                file: None,
                direct: false,
                recordings: Vec::new(),
            },
        };
        Ok(self.nodes.entry(name).or_insert(node))
    }

    pub fn get(&self, name: &str) -> Result<&Node, NodeError> {
        self.nodes.get(name).ok_or_else(|| NodeError::NotFound { name: name.to_string() })
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Node)> {
        self.nodes.iter()
    }

    /// Remove `name`, refused while a node above it (raw) names it. What else uses it (an
    /// export, a job) the caller checks first.
    pub fn remove(&mut self, name: &str) -> Result<Node, NodeError> {
        if !self.nodes.contains_key(name) {
            return Err(NodeError::NotFound { name: name.to_string() });
        }
        let above = self.nodes.iter().find(|(_, node)| node.driver == "raw" && node.file.as_deref() == Some(name));
        if let Some((user, _)) = above {
            return Err(NodeError::InUse { name: name.to_string(), user: format!("node '{user}'") });
        }
        let mut node = self.nodes.remove(name).expect("checked above");
        node.close_bitmaps(name);
        Ok(node)
    }

    /// The file node a node's bytes live in (itself, or below a raw node), for its sidecars.
    pub fn file_node_mut(&mut self, name: &str) -> Result<(String, &mut Node), NodeError> {
        let mut at = name.to_string();
        for _ in 0..self.nodes.len() {
            let node = self.get(&at)?;
            match node.driver {
                "raw" => at = node.file.clone().expect("a raw node names its file"),
                "file" => {
                    let node = self.nodes.get_mut(&at).expect("found above");
                    return Ok((at, node));
                }
                _ => break,
            }
        }
        Err(NodeError::Bitmap {
            name: name.to_string(),
            bitmap: String::new(),
            reason: "persistent bitmaps need a file node below (a sidecar beside its image)".into(),
        })
    }

    /// Save every persistent bitmap (the daemon's clean stop).
    pub fn close_all_bitmaps(&mut self) {
        for (name, node) in self.nodes.iter_mut() {
            node.close_bitmaps(name);
        }
    }
}
