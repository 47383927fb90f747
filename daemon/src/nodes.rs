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
    #[error("node '{name}': {reason}")]
    Invalid { name: String, reason: String },
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
    /// A copy-before-write node's hidden backup job (sync=none) and its point-in-time view.
    pub fleecing: Option<Fleecing>,
    /// Nodes its options defined inline: deleted with it.
    pub implicit_children: Vec<String>,
}

/// What a copy-before-write node runs: QEMU's filter is Tandem's sync=none backup, whose
/// view a snapshot-access node reads.
pub struct Fleecing {
    pub job: tandem::job::Job,
    pub view: Arc<tandem::job::backup::SnapshotView>,
    /// The node it saves to.
    pub target: String,
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
    /// A node of its own disk, without a file node's sidecars or a filter's job.
    fn plain(disk: Disk, driver: &'static str, spec: &BlockdevSpec, file: Option<String>) -> Node {
        let (read_only, unmap) = (spec.read_only, spec.unmap);
        let (recordings, fleecing, implicit_children) = (Vec::new(), None, Vec::new());
        Node { disk, driver, read_only, unmap, file, direct: false, recordings, fleecing, implicit_children }
    }

    /// Load and record every sidecar beside `image` into this node's disk. A file whose stored
    /// name is not the one its file name gives belongs to another image whose name starts like
    /// this one (`disk.img.bak.b0.bitmap` beside `disk.img`): it is left untouched. On an error
    /// the sidecars opened so far are closed again, as they were.
    fn load_bitmaps(&mut self, node_name: &str, image: &Path) -> Result<(), NodeError> {
        for (name, path) in sidecars(image) {
            let bad = |reason: String| NodeError::Bitmap { name: node_name.to_string(), bitmap: name.clone(), reason };
            let stored = match tandem::bitmap::load(&path) {
                Ok(loaded) => loaded.name,
                Err(error) => {
                    self.close_bitmaps(node_name);
                    return Err(bad(error.to_string()));
                }
            };
            if stored != name {
                continue;
            }
            if let Err(error) = self.record_sidecar(node_name, &name, &path) {
                self.close_bitmaps(node_name);
                return Err(bad(error));
            }
        }
        Ok(())
    }

    /// Mark one sidecar in use and record into it through this node's disk.
    fn record_sidecar(&mut self, node_name: &str, name: &str, path: &Path) -> Result<(), String> {
        let recording = tandem::bitmap::open_for_recording_any(path).map_err(|e| e.to_string())?;
        if let Err(error) = self.disk.bitmaps().add_shared(name, recording.bitmap().clone()) {
            let _ = recording.close(); // back as it was: in use only if it was inconsistent
            return Err(error.to_string());
        }
        if recording.bitmap().is_inconsistent() {
            tandem::log::line(&format!(
                "node {node_name}: persistent bitmap '{name}' loaded as inconsistent: its process stopped while \
                 recording it ({}); back up with on-inconsistent-bitmap=full or remove it",
                path.display()
            ));
        }
        self.recordings.push(recording);
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
        // Inline children first; all or nothing.
        let mut added: Vec<String> = Vec::new();
        for child in &spec.children {
            if let Err(error) = self.add(runtime, child) {
                self.remove_all(&added);
                return Err(error);
            }
            added.push(child.node_name.clone());
        }
        match self.add_one(runtime, spec) {
            Ok(()) => {
                let node = self.nodes.get_mut(&name).expect("just added");
                node.implicit_children = added;
                Ok(node)
            }
            Err(error) => {
                self.remove_all(&added);
                Err(error)
            }
        }
    }

    /// Remove `names`, newest first (what an add made before it failed).
    fn remove_all(&mut self, names: &[String]) {
        for name in names.iter().rev() {
            drop(self.remove(name));
        }
    }

    fn add_one(&mut self, runtime: &RuntimeHandle, spec: &BlockdevSpec) -> Result<(), NodeError> {
        let name = spec.node_name.clone();
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
                    fleecing: None,
                    implicit_children: Vec::new(),
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
                    fleecing: None,
                    implicit_children: Vec::new(),
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
                fleecing: None,
                implicit_children: Vec::new(),
            },
            DriverSpec::Nbd { uri } => {
                let config = tandem_drivers::nbd::NbdConfig { read_only: spec.read_only, ..Default::default() };
                let driver = tandem_drivers::nbd::NbdDriver::open(runtime, uri, &config)
                    .map_err(|e| NodeError::Invalid { name: name.clone(), reason: e.to_string() })?;
                Node::plain(Disk::new(Arc::new(driver)), "nbd", spec, None)
            }
            DriverSpec::Rbd { spec: rbd } => {
                let options = tandem_drivers::rbd::RbdOptions { read_only: spec.read_only, ..Default::default() };
                let driver = tandem_drivers::rbd::RbdDriver::open(rbd, &options)
                    .map_err(|e| NodeError::Invalid { name: name.clone(), reason: e.to_string() })?;
                Node::plain(Disk::new(Arc::new(driver)), "rbd", spec, Some(format!("{}/{}", rbd.pool, rbd.image)))
            }
            DriverSpec::CopyBeforeWrite { .. } => self.copy_before_write(runtime, &name, spec)?,
            DriverSpec::SnapshotAccess { file } => self.snapshot_access(&name, file)?,
        };
        self.nodes.insert(name, node);
        Ok(())
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
        let above = self.nodes.iter().find(|(_, node)| {
            let saves_to = node.fleecing.as_ref().is_some_and(|f| f.target == name);
            saves_to || (node.driver != "file" && node.file.as_deref() == Some(name))
        });
        if let Some((user, _)) = above {
            return Err(NodeError::InUse { name: name.to_string(), user: format!("node '{user}'") });
        }
        let mut node = self.nodes.remove(name).expect("checked above");
        node.close_bitmaps(name);
        // Its inline children go with it (QEMU deletes implicitly created nodes so).
        let children = std::mem::take(&mut node.implicit_children);
        self.remove_all(&children);
        if let Some(fleecing) = node.fleecing.take() {
            // The filter comes off with its job; the target keeps what it saved.
            let _ = fleecing.job.cancel(true);
            fleecing.job.wait_for(|s| s.is_finished(), std::time::Duration::from_secs(600));
        }
        Ok(node)
    }

    /// A copy-before-write node over `file`, saving to `target`: a sync=none backup with a
    /// view, hidden from the job list (QEMU's filter is no job either).
    fn copy_before_write(&self, runtime: &RuntimeHandle, name: &str, spec: &BlockdevSpec) -> Result<Node, NodeError> {
        let DriverSpec::CopyBeforeWrite { file, target, on_cbw_error, cbw_timeout_s, min_cluster_bytes } = &spec.driver
        else {
            unreachable!("called for copy-before-write")
        };
        let missing = |node: &String| NodeError::NoSuchFile { name: name.to_string(), file: node.clone() };
        let below = self.nodes.get(file).ok_or_else(|| missing(file))?;
        let target_node = self.nodes.get(target).ok_or_else(|| missing(target))?;
        let job_error = |e: tandem::job::JobError| NodeError::Open {
            name: name.to_string(),
            source: tandem::Error::Config {
                name: "copy-before-write",
                value: name.to_string(),
                reason: Box::leak(e.to_string().into_boxed_str()),
            },
        };
        let mut config = tandem::job::backup::BackupConfig {
            id: format!("#cbw-{name}"),
            sync: tandem::job::SyncMode::None,
            min_cluster_bytes: *min_cluster_bytes,
            cbw_timeout: cbw_timeout_s.map(std::time::Duration::from_secs),
            ..tandem::job::backup::BackupConfig::default()
        };
        if let Some(policy) = on_cbw_error {
            config.on_cbw_error = tandem::job::copy_before_write::OnCbwError::parse(policy).map_err(job_error)?;
        }
        let (job, view) = tandem::job::backup::start_with_view(runtime, &below.disk, target_node.disk.driver(), config)
            .map_err(job_error)?;
        Ok(Node {
            disk: below.disk.clone(),
            driver: "copy-before-write",
            read_only: below.read_only,
            unmap: below.unmap,
            file: Some(file.clone()),
            direct: below.direct,
            recordings: Vec::new(),
            fleecing: Some(Fleecing { job, view, target: target.clone() }),
            implicit_children: Vec::new(),
        })
    }

    /// A read-only node over a copy-before-write node's point in time.
    fn snapshot_access(&self, name: &str, file: &str) -> Result<Node, NodeError> {
        let below = self
            .nodes
            .get(file)
            .ok_or_else(|| NodeError::NoSuchFile { name: name.to_string(), file: file.to_string() })?;
        let Some(fleecing) = &below.fleecing else {
            let reason =
                format!("file={file}: snapshot-access reads a copy-before-write node, not a {} node", below.driver);
            return Err(NodeError::Invalid { name: name.to_string(), reason });
        };
        let disk = Disk::new(fleecing.view.clone());
        // The export of the point in time shows the bitmaps of the disk below (QEMU's export
        // reaches them through the graph): shared, not copied.
        for bitmap in below.disk.bitmaps().names() {
            if let Ok(shared) = below.disk.bitmaps().get(&bitmap) {
                let _ = disk.bitmaps().add_shared(&bitmap, shared);
            }
        }
        Ok(Node {
            disk,
            driver: "snapshot-access",
            read_only: true,
            unmap: false,
            file: Some(file.to_string()),
            direct: false,
            recordings: Vec::new(),
            fleecing: None,
            implicit_children: Vec::new(),
        })
    }

    /// The file node a node's bytes live in (itself, or below raw and filter nodes), for its
    /// sidecars.
    pub fn file_node_mut(&mut self, name: &str) -> Result<(String, &mut Node), NodeError> {
        self.get(name)?;
        let root = self.disk_root(name);
        match self.nodes.get_mut(&root) {
            Some(node) if node.driver == "file" => Ok((root, node)),
            _ => Err(NodeError::Invalid {
                name: name.to_string(),
                reason: "persistent bitmaps need a file node below (a sidecar beside its image)".into(),
            }),
        }
    }

    /// The node whose disk `name` reads and writes: below raw and copy-before-write nodes,
    /// which share their file's disk (and so its bitmaps). `name` itself for any other.
    pub fn disk_root(&self, name: &str) -> String {
        let mut at = name.to_string();
        for _ in 0..self.nodes.len() {
            match self.nodes.get(&at) {
                Some(node) if ["raw", "copy-before-write"].contains(&node.driver) => {
                    at = node.file.clone().expect("a raw or filter node names its file")
                }
                _ => break,
            }
        }
        at
    }

    /// The names of the persistent bitmaps of the disk `name` reads (its file node's sidecars).
    pub fn persistent_names(&self, name: &str) -> Vec<String> {
        match self.nodes.get(&self.disk_root(name)) {
            Some(node) => node.recordings.iter().map(|r| r.name().to_string()).collect(),
            None => Vec::new(),
        }
    }

    /// Save every persistent bitmap (the daemon's clean stop).
    pub fn close_all_bitmaps(&mut self) {
        for (name, node) in self.nodes.iter_mut() {
            node.close_bitmaps(name);
        }
    }
}
