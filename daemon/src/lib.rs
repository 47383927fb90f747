//! `tandemd`: qemu-storage-daemon's command line over Tandem. It opens the `--blockdev` nodes,
//! starts the NBD server (`--nbd-server`) and its exports (`--export`), writes `--pidfile`,
//! and runs until SIGTERM or SIGINT, then shuts down cleanly: exports stop reading, requests
//! under way finish, writable disks are flushed, the socket and pidfile it created are
//! removed. A second signal exits at once. Everything is checked before anything starts.
//!
//! The daemon is thin: option parsing ([`options`], [`keyval`]), a catalog of nodes
//! ([`nodes`]) and calls into `tandem-nbd` and the engine.

mod commands;
pub mod keyval;
pub mod nodes;
pub mod options;
mod pidfile;
pub mod qmp;
mod signals;

use clap::Parser;
use nodes::Catalog;
use options::{ExportSpec, NbdServerSpec};
use std::path::PathBuf;
use tandem::reactor::{Config, Runtime};
use tandem::IoPriority;
use tandem_nbd::{ExportOptions, Server, ServerConfig};

#[derive(Parser, Debug)]
#[command(
    name = "tandemd",
    version,
    about = "Tandem storage daemon: qemu-storage-daemon's options, Tandem's engine",
    after_help = "Options take QEMU's key=value syntax (',,' is a comma in a value) or a JSON object.\n\
                  Example:\n  tandemd --blockdev driver=file,node-name=f,filename=disk.img,cache.direct=on \\\n    \
                  --blockdev driver=raw,node-name=r,file=f \\\n    \
                  --nbd-server addr.type=unix,addr.path=/run/disk.sock \\\n    \
                  --export type=nbd,id=e,node-name=r,name=disk,writable=on"
)]
pub struct Args {
    /// A block node: driver=file|host_device (filename=, cache.direct=, read-only=, aio=),
    /// driver=raw (file=NODE), driver=null-co (size=). Repeatable, in order.
    #[arg(long, value_name = "OPTIONS")]
    pub blockdev: Vec<String>,
    /// The NBD server: addr.type=unix,addr.path=PATH or addr.type=inet,addr.host=H[,addr.port=P]
    /// (default port 10809), max-connections=N, handshake-max-seconds=S. TLS is not supported.
    #[arg(long, value_name = "OPTIONS")]
    pub nbd_server: Option<String>,
    /// An export: type=nbd,id=ID,node-name=NODE[,name=NAME][,writable=on][,description=TEXT]
    /// [,bitmaps.0=NAME...][,multi-conn=on|off|auto]. Repeatable.
    #[arg(long, value_name = "OPTIONS")]
    pub export: Vec<String>,
    /// A character device for a QMP monitor: socket,id=ID,path=PATH,server=on,wait=off (a Unix
    /// socket the daemon creates and removes; an existing path is refused). Repeatable.
    #[arg(long, value_name = "OPTIONS")]
    pub chardev: Vec<String>,
    /// A QMP monitor on a --chardev: chardev=ID[,mode=control]. Repeatable.
    #[arg(long, value_name = "OPTIONS")]
    pub monitor: Vec<String>,
    /// An object: iothread,id=ID (accepted: Tandem's cores serve every export). Repeatable.
    #[arg(long, value_name = "OPTIONS")]
    pub object: Vec<String>,
    /// Write the daemon's pid here once it serves (removed at exit).
    #[arg(long, value_name = "PATH")]
    pub pidfile: Option<PathBuf>,
    /// Worker cores of the engine [default: the CPUs this process may use].
    #[arg(long, value_name = "N")]
    pub cores: Option<usize>,
}

/// Everything the command line asks for, checked, before anything is opened.
struct Plan {
    blockdevs: Vec<options::BlockdevSpec>,
    server: Option<NbdServerSpec>,
    exports: Vec<ExportSpec>,
    /// The QMP monitors' socket paths.
    monitors: Vec<PathBuf>,
}

/// A socket nobody listens on: what a daemon killed with SIGKILL leaves behind. QEMU unlinks
/// any file at a monitor's path; tandemd replaces only this, which holds no one's data.
fn is_stale_socket(path: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let socket = path.symlink_metadata().is_ok_and(|m| m.file_type().is_socket());
    socket
        && std::os::unix::net::UnixStream::connect(path)
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// Each `--monitor` on its `--chardev`, checked: a known chardev, used once, at a path that
/// does not exist yet.
fn monitors(args: &Args) -> Result<Vec<PathBuf>, String> {
    let chardevs = args.chardev.iter().map(|c| options::parse_chardev(c)).collect::<Result<Vec<_>, _>>();
    let chardevs = chardevs.map_err(|e| e.to_string())?;
    for object in &args.object {
        options::parse_object(object).map_err(|e| e.to_string())?;
    }
    let mut paths = Vec::new();
    for monitor in &args.monitor {
        let id = options::parse_monitor(monitor).map_err(|e| e.to_string())?;
        let Some(chardev) = chardevs.iter().find(|c| c.id == id) else {
            return Err(format!("--monitor chardev={id}: no --chardev has id={id}"));
        };
        if paths.contains(&chardev.path) {
            return Err(format!("--monitor chardev={id}: that chardev has a monitor already"));
        }
        if chardev.path.symlink_metadata().is_ok() && !is_stale_socket(&chardev.path) {
            let path = chardev.path.display();
            return Err(format!(
                "--chardev id={id}: {path} exists and is not a dead socket (tandemd never replaces a file it did not create)"
            ));
        }
        paths.push(chardev.path.clone());
    }
    Ok(paths)
}

fn plan(args: &Args) -> Result<Plan, String> {
    let blockdevs = args.blockdev.iter().map(|b| options::parse_blockdev(b)).collect::<Result<Vec<_>, _>>();
    let server = args.nbd_server.as_deref().map(options::parse_nbd_server).transpose();
    let exports = args.export.iter().map(|e| options::parse_export(e)).collect::<Result<Vec<_>, _>>();
    let plan = Plan {
        blockdevs: blockdevs.map_err(|e| e.to_string())?,
        server: server.map_err(|e| e.to_string())?,
        exports: exports.map_err(|e| e.to_string())?,
        monitors: monitors(args)?,
    };
    if !plan.exports.is_empty() && plan.server.is_none() {
        return Err("--export type=nbd needs --nbd-server".into());
    }
    let mut ids: Vec<&str> = plan.exports.iter().map(|e| e.id.as_str()).collect();
    ids.sort_unstable();
    if let Some(pair) = ids.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(format!("--export id={}: an export with this id already exists", pair[0]));
    }
    Ok(plan)
}

/// Run the daemon until a signal; the error is the message to print.
pub fn run(args: Args) -> Result<(), String> {
    let plan = plan(&args)?;
    let pidfile = args.pidfile.as_deref().map(pidfile::check).transpose()?;
    signals::block_termination();
    let mut config = Config::default();
    if let Some(cores) = args.cores {
        config.cores = cores;
    }
    let runtime = Runtime::new(config).map_err(|e| e.to_string())?;
    let mut catalog = Catalog::default();
    for spec in &plan.blockdevs {
        catalog.add(&runtime.handle(), spec).map_err(|e| e.to_string())?;
    }
    let server = match &plan.server {
        Some(spec) => Some(start_server(&runtime, spec, &plan.exports, &catalog)?),
        None => None,
    };
    let daemon = std::sync::Arc::new(commands::Daemon::new(runtime.handle(), catalog));
    if let Some(server) = server {
        daemon.adopt_server(server, &plan.exports);
    }
    let mut monitors = Vec::new();
    for path in &plan.monitors {
        if is_stale_socket(path) {
            tandem::log::line(&format!("replacing the dead socket {} (its daemon was killed)", path.display()));
            std::fs::remove_file(path).map_err(|e| format!("--chardev {}: {e}", path.display()))?;
        }
        // After block_termination: the monitor's threads inherit the blocked signals.
        let monitor = qmp::Monitor::start(path, daemon.clone()).map_err(|e| e.to_string())?;
        daemon.set_events(monitor.events());
        monitors.push(monitor);
    }
    let pidfile = pidfile.map(|p| p.write()).transpose()?;
    signals::wait_for_termination();
    // No command may start once the stop began (one after the bitmaps' clean save would go
    // unrecorded): the monitors go first.
    for monitor in monitors {
        monitor.shutdown();
    }
    daemon.shutdown();
    drop(pidfile);
    Ok(())
}

/// Each export's options against the catalog, checked before the server binds anything.
fn export_options(
    exports: &[ExportSpec],
    catalog: &Catalog,
) -> Result<Vec<(tandem::block::Disk, ExportOptions)>, String> {
    let mut names: Vec<&str> = exports.iter().map(|e| e.name.as_str()).collect();
    names.sort_unstable();
    if let Some(pair) = names.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(format!("--export name={}: two exports have this name", pair[0]));
    }
    exports
        .iter()
        .map(|export| {
            commands::export_options(export, catalog).map_err(|message| format!("--export id={}: {message}", export.id))
        })
        .collect()
}

fn start_server(
    runtime: &Runtime,
    spec: &NbdServerSpec,
    exports: &[ExportSpec],
    catalog: &Catalog,
) -> Result<Server, String> {
    let exports = export_options(exports, catalog)?;
    let mut config = ServerConfig::new(spec.listen.clone());
    if let Some(max) = spec.connections_max {
        config.connections_max = max;
    }
    if let Some(timeout) = spec.handshake_timeout {
        config.handshake_timeout = timeout;
    }
    let server = Server::start(runtime.handle(), config).map_err(|e| e.to_string())?;
    for (disk, options) in exports {
        // Checked above; on an error anyway `server` is dropped, removing the socket it made.
        server.add_export(disk, options).map_err(|e| e.to_string())?;
    }
    tandem::log::line(&format!("NBD server listening on {}", spec.listen));
    Ok(server)
}

/// Make every acknowledged write durable before exit.
pub(crate) fn flush_all(catalog: &Catalog) {
    for (name, node) in catalog.iter().filter(|(_, node)| !node.read_only) {
        if let Err(e) = node.disk.flush_blocking(IoPriority::GUEST) {
            tandem::log::line(&format!("flush of node {name} failed at exit: {e}"));
        }
    }
}
