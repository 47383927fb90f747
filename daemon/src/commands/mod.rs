//! The daemon's QMP commands, with QEMU's names, arguments and error texts (qapi/block-core.json,
//! job.json, block-export.json): [`Daemon`] owns the catalog of nodes, the NBD server and its
//! exports, and the jobs, and carries out each command on them. The QMP monitor (`qmp`) parses
//! and answers; this module decides. Parts: `args` reads arguments, `nodes` the node and export
//! commands, `jobs` the job commands and the events they send, `bitmaps` the dirty bitmaps,
//! `transaction` several of them at once.
//!
//! One lock (`state`) guards the catalog, the server, the exports and the jobs: commands are
//! rare and short, and a command that waits (a backup's start drains the disk) holds it, so
//! no other command sees a half-made change. Event forwarding takes it only to forget a
//! dismissed job, never while it sends.

mod args;
mod bitmaps;
mod jobs;
mod nodes;
mod schema;
mod transaction;

use crate::nodes::Catalog;
use crate::qmp::{Commands, EventSender, QmpError};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tandem::reactor::RuntimeHandle;

pub(crate) use args::Arguments;
pub(crate) use nodes::export_options;

/// What the daemon runs: nodes, the NBD server, exports, jobs.
#[derive(Default)]
pub(crate) struct State {
    pub(crate) catalog: Catalog,
    pub(crate) server: Option<nodes::ServerRecord>,
    pub(crate) exports: BTreeMap<String, nodes::ExportRecord>,
    pub(crate) jobs: BTreeMap<String, jobs::JobRecord>,
}

/// The daemon's command handler (see the module doc).
pub(crate) struct Daemon {
    runtime: RuntimeHandle,
    state: Arc<Mutex<State>>,
    /// Every monitor's event sender (each has its own clients); empty before any runs.
    events: Mutex<Vec<EventSender>>,
}

type Handler = fn(&Daemon, Arguments) -> Result<Value, QmpError>;

/// Every command `execute` knows, in `query-commands` order.
const COMMANDS: &[(&str, Handler)] = &[
    ("query-version", nodes::query_version),
    ("query-qmp-schema", query_qmp_schema),
    ("quit", nodes::quit),
    ("query-named-block-nodes", nodes::query_named_block_nodes),
    ("blockdev-add", nodes::blockdev_add),
    ("blockdev-del", nodes::blockdev_del),
    ("nbd-server-start", nodes::nbd_server_start),
    ("nbd-server-stop", nodes::nbd_server_stop),
    ("block-export-add", nodes::block_export_add),
    ("block-export-del", nodes::block_export_del),
    ("query-block-exports", nodes::query_block_exports),
    ("blockdev-mirror", jobs::blockdev_mirror),
    ("blockdev-backup", jobs::blockdev_backup),
    ("query-block-jobs", jobs::query_block_jobs),
    ("query-jobs", jobs::query_jobs),
    ("job-pause", jobs::job_pause),
    ("job-resume", jobs::job_resume),
    ("job-cancel", jobs::job_cancel),
    ("job-complete", jobs::job_complete),
    ("job-finalize", jobs::job_finalize),
    ("job-dismiss", jobs::job_dismiss),
    ("block-job-pause", jobs::block_job_pause),
    ("block-job-resume", jobs::block_job_resume),
    ("block-job-cancel", jobs::block_job_cancel),
    ("block-job-complete", jobs::block_job_complete),
    ("block-job-finalize", jobs::block_job_finalize),
    ("block-job-dismiss", jobs::block_job_dismiss),
    ("block-job-set-speed", jobs::block_job_set_speed),
    ("block-job-change", jobs::block_job_change),
    ("block-dirty-bitmap-add", bitmaps::add),
    ("block-dirty-bitmap-remove", bitmaps::remove),
    ("block-dirty-bitmap-clear", bitmaps::clear),
    ("block-dirty-bitmap-enable", bitmaps::enable),
    ("block-dirty-bitmap-disable", bitmaps::disable),
    ("block-dirty-bitmap-merge", bitmaps::merge),
    ("transaction", transaction::transaction),
];

fn query_qmp_schema(_daemon: &Daemon, args: Arguments) -> Result<Value, QmpError> {
    args.finish()?;
    Ok(schema::query_qmp_schema())
}

impl Daemon {
    /// A daemon over `catalog` (the `--blockdev` nodes), with no server and no jobs yet.
    pub(crate) fn new(runtime: RuntimeHandle, catalog: Catalog) -> Daemon {
        let state = State { catalog, ..State::default() };
        Daemon { runtime, state: Arc::new(Mutex::new(state)), events: Mutex::new(Vec::new()) }
    }

    /// The NBD server the command line started, with its exports, so QMP sees and manages
    /// them as its own.
    pub(crate) fn adopt_server(&self, server: tandem_nbd::Server, exports: &[crate::options::ExportSpec]) {
        let mut state = self.state();
        for spec in exports {
            let Some(export) = server.exports().get(&spec.name) else { continue };
            let record = nodes::ExportRecord { node_name: spec.node_name.clone(), name: spec.name.clone(), export };
            state.exports.insert(spec.id.clone(), record);
        }
        state.server = Some(nodes::ServerRecord { server });
    }

    /// A monitor's clients get every event from now on.
    pub fn set_events(&self, events: EventSender) {
        self.event_senders_lock().push(events);
    }

    fn event_senders_lock(&self) -> MutexGuard<'_, Vec<EventSender>> {
        self.events.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The monitors' senders now (a job's forwarder keeps its own copy).
    pub(crate) fn event_senders(&self) -> Vec<EventSender> {
        self.event_senders_lock().clone()
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        // A handler that panicked while holding the lock left the state as it was at the
        // panic; every change is made whole or not at all, so going on is sound.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn emit(&self, name: &str, data: Value) {
        for events in self.event_senders() {
            events.emit(name, data.clone());
        }
    }

    pub(crate) fn runtime(&self) -> &RuntimeHandle {
        &self.runtime
    }

    /// The NBD server's exports and jobs end, writable nodes are flushed: the clean stop of
    /// SIGTERM. Jobs are cancelled by their rules (a ready mirror finishes consistent).
    pub fn shutdown(&self) {
        jobs::cancel_all(self);
        let server = self.state().server.take();
        if let Some(server) = server {
            server.server.shutdown();
        }
        let mut state = self.state();
        crate::flush_all(&state.catalog);
        state.catalog.close_all_bitmaps();
    }
}

impl Commands for Daemon {
    fn execute(&self, name: &str, arguments: Map<String, Value>) -> Result<Value, QmpError> {
        match COMMANDS.iter().find(|(command, _)| *command == name) {
            Some((_, handler)) => handler(self, Arguments::new(arguments)),
            None => Err(QmpError {
                class: crate::qmp::ErrorClass::CommandNotFound,
                desc: format!("The command {name} has not been found"),
            }),
        }
    }

    fn names(&self) -> Vec<&'static str> {
        COMMANDS.iter().map(|(name, _)| *name).collect()
    }
}

#[cfg(test)]
mod tests;
