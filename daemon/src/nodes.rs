//! The daemon's catalog of block nodes by node-name, built from `--blockdev` options in the
//! order given (a `raw` node names a node defined before it, as in QEMU). Opening never
//! creates or resizes anything: a missing file is an error that names it.

use crate::options::{BlockdevSpec, DriverSpec};
use std::collections::BTreeMap;
use std::sync::Arc;
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
                Node {
                    disk: Disk::new(Arc::new(driver)),
                    driver: "file",
                    read_only: spec.read_only,
                    unmap: spec.unmap,
                    file: Some(filename.display().to_string()),
                    direct: *direct,
                }
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
                }
            }
            DriverSpec::NullCo { size_bytes } => Node {
                disk: Disk::new(Arc::new(NullDriver::new(*size_bytes))),
                driver: "null-co",
                read_only: spec.read_only,
                unmap: spec.unmap,
                file: None,
                direct: false,
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
        Ok(self.nodes.remove(name).expect("checked above"))
    }
}
