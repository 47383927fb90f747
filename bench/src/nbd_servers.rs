//! `tandem-bench compare-nbd`: Tandem's NBD server (the `tandemd` binary) against `qemu-nbd`
//! and `qemu-storage-daemon --export type=nbd`, each exporting the same scratch file with
//! O_DIRECT over a Unix socket, driven by the same client (fio's libnbd-based nbd engine) with
//! one and four connections. Per row: client IOPS and MiB/s, and the server's CPU per I/O read
//! from /proc; ratios against both QEMU servers and against fio's io_uring engine on the file
//! itself (the device's ceiling, in the same run). Servers alternate order each round so drift
//! on the machine hits all alike. The scratch file is created in a new directory under --dir
//! and removed with it.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::procstat::cpu_s;

#[derive(clap::Args, Debug)]
pub struct NbdArgs {
    /// Directory for the scratch file (a disk filesystem: the servers use O_DIRECT).
    #[arg(long, default_value = "/var/tmp")]
    pub dir: PathBuf,
    /// Size of the scratch file, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 6)]
    pub runtime: u64,
    /// Rounds; figures are the mean, spread is min-max.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The servers, and "device": fio's io_uring engine on the file itself, no server at all (the
/// ceiling: when every server reaches it, their ratios say nothing of the servers).
const SERVERS: [&str; 4] = ["tandemd", "qemu-nbd", "qsd", "device"];
/// (rw, block size, iodepth, connections)
const ROWS: [(&str, &str, u32, u32); 6] = [
    ("randread", "4k", 16, 1),
    ("randwrite", "4k", 16, 1),
    ("randread", "4k", 16, 4),
    ("randwrite", "4k", 16, 4),
    ("read", "1M", 8, 1),
    ("write", "1M", 8, 1),
];

#[derive(Clone, Copy, Default, Debug)]
struct Cell {
    iops: f64,
    mib_per_s: f64,
    server_cpu_us_per_io: f64,
}

pub fn compare_nbd_command(args: &NbdArgs) -> Result<(), String> {
    if args.size_mib == 0 || args.runtime == 0 || args.rounds == 0 || args.rounds > 100 {
        return Err("--size-mib, --runtime and --rounds (<= 100) must be positive".into());
    }
    let tandemd = crate::mirror::DaemonKind::Tandemd.program().map_err(|e| e.to_string())?;
    let dir = tempfile::Builder::new()
        .prefix("compare-nbd-")
        .tempdir_in(&args.dir)
        .map_err(|e| format!("--dir {}: {e}", args.dir.display()))?;
    let image = dir.path().join("d.img");
    lay_out(&image, args.size_mib)?;
    // results[server][row] = one cell per round
    let mut results = vec![vec![Vec::new(); ROWS.len()]; SERVERS.len()];
    for round in 0..args.rounds {
        let mut order: Vec<usize> = (0..SERVERS.len()).collect();
        order.rotate_left(round as usize % SERVERS.len());
        for server in order {
            eprintln!("compare-nbd: round {}/{}: {}", round + 1, args.rounds, SERVERS[server]);
            let (cells, child) = match SERVERS[server] {
                "device" => (
                    measure_rows(
                        None,
                        &[format!("--filename={}", image.display()), "--ioengine=io_uring".into(), "--direct=1".into()],
                        args,
                    ),
                    None,
                ),
                name => {
                    let child = serve(name, &tandemd, dir.path(), &image)?;
                    let uri = format!("--uri=nbd+unix:///?socket={}", dir.path().join("s.sock").display());
                    (measure_rows(Some(&child), &["--ioengine=nbd".into(), uri], args), Some(child))
                }
            };
            if let Some(mut child) = child {
                stop(&mut child);
            }
            for (row, cell) in cells?.into_iter().enumerate() {
                results[server][row].push(cell);
            }
        }
    }
    let report = report(&results, args);
    match args.json {
        true => println!("{}", serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?),
        false => print!("{}", table(&report)),
    }
    Ok(())
}

fn lay_out(image: &Path, size_mib: u64) -> Result<(), String> {
    let status = Command::new("fio")
        .args(["--name=lay", &format!("--filename={}", image.display()), &format!("--size={size_mib}M")])
        .args(["--rw=write", "--bs=1M", "--direct=1", "--ioengine=io_uring"])
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run fio (apt-get install -y fio): {e}"))?;
    status.success().then_some(()).ok_or_else(|| "fio could not lay out the scratch file".into())
}

fn serve(server: &str, tandemd: &Path, dir: &Path, image: &Path) -> Result<Child, String> {
    let socket = dir.join("s.sock");
    let _ = std::fs::remove_file(&socket); // ours: a server of the previous measurement made it
    let image = image.display();
    let qsd_args = [
        "--blockdev".to_string(),
        format!("driver=file,node-name=f,filename={image},cache.direct=on,aio=io_uring"),
        "--blockdev".into(),
        "driver=raw,node-name=r,file=f".into(),
        "--nbd-server".into(),
        format!("addr.type=unix,addr.path={},max-connections=8", socket.display()),
        "--export".into(),
        "type=nbd,id=e,node-name=r,name=,writable=on".into(),
    ];
    let mut command = match server {
        "tandemd" => Command::new(tandemd),
        "qsd" => Command::new("qemu-storage-daemon"),
        _ => Command::new("qemu-nbd"),
    };
    match server {
        "qemu-nbd" => command.args(["-f", "raw", "-t", "-k", &socket.display().to_string(), "--cache=none"]).args([
            "--aio=io_uring",
            "-e",
            "8",
            &image.to_string(),
        ]),
        _ => command.args(qsd_args),
    };
    let mut child =
        command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().map_err(|e| format!("{server}: {e}"))?;
    for _ in 0..200 {
        if socket.exists() {
            return Ok(child);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{server} exited at start: {status}"));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    stop(&mut child);
    Err(format!("{server} never created its socket"))
}

fn stop(child: &mut Child) {
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

/// Every row through fio with `target` (its engine and where it goes); the server's CPU per
/// I/O when there is a server.
fn measure_rows(server: Option<&Child>, target: &[String], args: &NbdArgs) -> Result<Vec<Cell>, String> {
    let cpu = || server.map_or(0.0, |child| cpu_s(child.id()));
    ROWS.iter()
        .map(|(rw, bs, depth, conns)| {
            let before = cpu();
            let (iops, mib_per_s, ios) = run_fio(target, rw, bs, *depth, *conns, args)?;
            let used = cpu() - before;
            Ok(Cell { iops, mib_per_s, server_cpu_us_per_io: used * 1e6 / ios.max(1.0) })
        })
        .collect()
}

fn run_fio(
    target: &[String],
    rw: &str,
    bs: &str,
    depth: u32,
    conns: u32,
    args: &NbdArgs,
) -> Result<(f64, f64, f64), String> {
    let output = Command::new("fio")
        .args(["--name=j".to_string(), format!("--size={}M", args.size_mib)])
        .args(target)
        .args([format!("--rw={rw}"), format!("--bs={bs}"), format!("--iodepth={depth}"), format!("--numjobs={conns}")])
        .args(["--group_reporting", "--time_based", &format!("--runtime={}", args.runtime), "--output-format=json"])
        .output()
        .map_err(|e| format!("fio: {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let json_start =
        text.find('{').ok_or_else(|| format!("fio printed no JSON: {}", String::from_utf8_lossy(&output.stderr)))?;
    let parsed: Value = serde_json::from_str(&text[json_start..]).map_err(|e| format!("fio JSON: {e}"))?;
    let job = &parsed["jobs"][0];
    let sum = |key: &str| job["read"][key].as_f64().unwrap_or(0.0) + job["write"][key].as_f64().unwrap_or(0.0);
    if job["error"].as_i64().unwrap_or(0) != 0 {
        return Err(format!("fio {rw} {bs} failed with error {}", job["error"]));
    }
    Ok((sum("iops"), sum("bw_bytes") / (1 << 20) as f64, sum("total_ios")))
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

fn report(results: &[Vec<Vec<Cell>>], args: &NbdArgs) -> Value {
    let rows: Vec<Value> = ROWS
        .iter()
        .enumerate()
        .map(|(row, (rw, bs, depth, conns))| {
            let stat = |server: usize, pick: fn(&Cell) -> f64| {
                let values: Vec<f64> = results[server][row].iter().map(pick).collect();
                let (min, max) = values.iter().fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
                json!({"mean": mean(&values), "min": min, "max": max})
            };
            let servers: serde_json::Map<String, Value> = SERVERS
                .iter()
                .enumerate()
                .map(|(s, name)| {
                    let cell = json!({
                        "iops": stat(s, |c| c.iops),
                        "mib_per_s": stat(s, |c| c.mib_per_s),
                        "server_cpu_us_per_io": stat(s, |c| c.server_cpu_us_per_io),
                    });
                    (name.to_string(), cell)
                })
                .collect();
            let ratio = |other: &str, key: &str| {
                servers["tandemd"][key]["mean"].as_f64().unwrap_or(0.0)
                    / servers[other][key]["mean"].as_f64().unwrap_or(1.0).max(1e-9)
            };
            json!({
                "rw": rw, "bs": bs, "iodepth": depth, "connections": conns,
                "servers": servers,
                "iops_ratio_qemu_nbd": ratio("qemu-nbd", "iops"),
                "iops_ratio_qsd": ratio("qsd", "iops"),
                "iops_ratio_device": ratio("device", "iops"),
                "cpu_per_io_ratio_qemu_nbd": ratio("qemu-nbd", "server_cpu_us_per_io"),
            })
        })
        .collect();
    json!({"rounds": args.rounds, "runtime_s": args.runtime, "size_mib": args.size_mib, "rows": rows})
}

fn table(report: &Value) -> String {
    let mut out = String::from(
        "job                        tandemd IOPS  qemu-nbd IOPS   qsd IOPS  device IOPS  x qemu-nbd  x qsd  x device   CPU us/IO (tandemd/qemu-nbd/qsd)  CPU x qemu-nbd\n",
    );
    for row in report["rows"].as_array().into_iter().flatten() {
        let mean = |server: &str, key: &str| row["servers"][server][key]["mean"].as_f64().unwrap_or(0.0);
        let label = format!(
            "{} {} QD{} x{}",
            row["rw"].as_str().unwrap_or(""),
            row["bs"].as_str().unwrap_or(""),
            row["iodepth"],
            row["connections"]
        );
        out += &format!(
            "{label:<26} {:>12.0} {:>14.0} {:>10.0} {:>12.0} {:>10.2}x {:>6.2}x {:>8.2}x   {:>8.1} / {:>6.1} / {:>6.1}           {:>6.2}x\n",
            mean("tandemd", "iops"),
            mean("qemu-nbd", "iops"),
            mean("qsd", "iops"),
            mean("device", "iops"),
            row["iops_ratio_qemu_nbd"].as_f64().unwrap_or(0.0),
            row["iops_ratio_qsd"].as_f64().unwrap_or(0.0),
            row["iops_ratio_device"].as_f64().unwrap_or(0.0),
            mean("tandemd", "server_cpu_us_per_io"),
            mean("qemu-nbd", "server_cpu_us_per_io"),
            mean("qsd", "server_cpu_us_per_io"),
            row["cpu_per_io_ratio_qemu_nbd"].as_f64().unwrap_or(0.0),
        );
    }
    out
}
