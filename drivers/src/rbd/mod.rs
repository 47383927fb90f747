//! The `rbd` driver: a Ceph RBD image as a Tandem disk, through librbd's asynchronous API.
//!
//! How a completion reaches the core that asked for it. Each request is an `Arc<Request>`
//! holding the caller's buffer, the result slot and the waker of the task awaiting it; one
//! reference goes to librbd as the completion's argument. librbd calls `on_complete`
//! (request.rs) on one of its own threads; that stores the return value and wakes the task. A Tandem
//! waker woken off its core posts the task to the core's inbox (and writes the core's eventfd
//! only if it sleeps), so the core is never blocked and no thread is started per request.
//! librbd's other scheme, an eventfd per image polled through the ring plus
//! `rbd_poll_io_events`, would tie an image to one core, where a disk here is shared by the
//! tasks of every core.
//!
//! Limits: at most [`RbdOptions::inflight_max`] requests are inside librbd per image (a
//! request beyond waits for a slot, and the slot goes back only when librbd is done with the
//! buffer, even if the caller stopped waiting). A cluster that stops answering fails
//! requests with ETIMEDOUT after [`RbdOptions::op_timeout_s`] (librados' `rados_osd_op_timeout`
//! and `rados_mon_op_timeout`, and `client_mount_timeout` for the connection), and the
//! driver's watchdog fails what librbd holds back beyond that: never a hang.
//!
//! `block_status` asks `rbd_diff_iterate2`, which is synchronous and may talk to the cluster,
//! so it runs on one metadata thread per image, never on a core (status.rs).

mod librbd;
mod request;
mod spec;
mod status;

pub use spec::RbdSpec;

use librbd::{lib, CompletionT, ImageT, IoctxT, Lib, RadosT};
use request::{Expiring, Request, Slots, Watchdog, EXPIRED};
use status::StatusThread;
use std::ffi::CString;
use std::future::Future;
use std::ptr::null_mut;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem::block::{Alignment, BlockDriver, BufResult, Capabilities, DeviceHold, Extent, IoFuture, WriteFlags};
use tandem::buf::AlignedBuf;
use tandem::error::errno_text;
use tandem::{Error, IoPriority, Result};

/// Why an rbd disk could not be opened (or an image created); each names the bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RbdError {
    #[error("{library} cannot be loaded ({detail}); it is in the Debian package {package}: apt-get install {package}")]
    LibraryMissing { library: &'static str, package: &'static str, detail: String },
    #[error("{library} has no {symbol} ({detail}): Ceph 15 (Octopus) or newer is needed")]
    Symbol { library: &'static str, symbol: &'static str, detail: String },
    #[error("bad rbd spec {spec}: {reason} (the form is rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:conf=PATH][:id=USER][:KEY=VALUE])")]
    Spec { spec: String, reason: &'static str },
    #[error("bad rbd option {key}={value}: {reason}")]
    Option { key: String, value: String, reason: String },
    #[error("cannot read the Ceph configuration {path}: {}", errno_text(*.errno))]
    Conf { path: String, errno: i32 },
    #[error("cannot connect to the Ceph cluster as client.{user} (conf {conf}): {}", errno_text(*.errno))]
    Connect { user: String, conf: String, errno: i32 },
    #[error("no pool {pool} in the Ceph cluster: {}", errno_text(*.errno))]
    Pool { pool: String, errno: i32 },
    #[error("cannot open rbd image {image}: {}", errno_text(*.errno))]
    Image { image: String, errno: i32 },
    #[error("cannot create rbd image {image} of {size_bytes} bytes: {}", errno_text(*.errno))]
    Create { image: String, size_bytes: u64, errno: i32 },
    #[error("a name in {value} holds a NUL byte")]
    Nul { value: String },
    #[error("cannot start the rbd driver's {what} thread: {detail}")]
    Thread { what: &'static str, detail: String },
}

/// How an rbd disk is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdOptions {
    /// Refuse writes (a snapshot always opens read-only).
    pub read_only: bool,
    /// Seconds after which an unanswered request fails with ETIMEDOUT. A `rados_osd_op_timeout`
    /// or `rados_mon_op_timeout` in the spec's options wins over it.
    pub op_timeout_s: u32,
    /// Requests inside librbd at once, per image.
    pub inflight_max: usize,
}

/// The most requests per image `inflight_max` may allow: far above any queue depth that pays
/// (librbd's own throttles start lower), and small enough that the objecter throttles sized
/// from it stay in range.
pub const INFLIGHT_MAX: usize = 4096;

impl RbdOptions {
    fn validate(&self) -> std::result::Result<(), RbdError> {
        let bad = |key: &str, value: String, reason: &str| {
            Err(RbdError::Option { key: key.into(), value, reason: reason.into() })
        };
        if !(1..=INFLIGHT_MAX).contains(&self.inflight_max) {
            return bad("inflight_max", self.inflight_max.to_string(), "must be 1 to 4096");
        }
        if self.op_timeout_s == 0 {
            return bad("op_timeout_s", "0".into(), "must be at least 1 second");
        }
        Ok(())
    }
}

impl Default for RbdOptions {
    fn default() -> RbdOptions {
        // 30 s: longer than a healthy cluster's recovery pauses, short enough that a job's
        // error policy sees a dead cluster. 128 requests: QEMU's rbd queue depth is a guest's,
        // and librbd's own throttles start above this.
        RbdOptions { read_only: false, op_timeout_s: 30, inflight_max: 128 }
    }
}

/// librados' cluster handle and the pool's I/O context; closed in that order on drop.
struct Cluster {
    lib: &'static Lib,
    rados: RadosT,
    ioctx: IoctxT,
}

// SAFETY: librados handles may be used from any thread (the library locks internally).
unsafe impl Send for Cluster {}
// SAFETY: as for Send: shared use from several threads is what librados supports.
unsafe impl Sync for Cluster {}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.rados.is_null() {
            return;
        }
        // SAFETY: both handles were created by this struct and are released once, ioctx first
        // (it is null when connecting failed before the pool was opened).
        unsafe {
            if !self.ioctx.is_null() {
                (self.lib.rados_ioctx_destroy)(self.ioctx);
            }
            (self.lib.rados_shutdown)(self.rados);
        }
    }
}

/// An open image; closed before its cluster.
struct Image {
    handle: ImageT,
    cluster: Cluster,
    /// How long dropping the image waits for rbd_close.
    close_wait: Duration,
}

// SAFETY: librbd image handles are thread-safe for I/O; close happens once, on drop, when no
// request holds the image any more (each request's future holds an `Arc<Image>`).
unsafe impl Send for Image {}
// SAFETY: as for Send: concurrent I/O on one image handle is what librbd's aio API is for.
unsafe impl Sync for Image {}

impl Drop for Image {
    /// rbd_close flushes librbd's cache (writes it acknowledged early) and waits for its
    /// requests, which a cluster that stopped answering never lets finish. So it runs on a
    /// thread of its own, and the drop waits for it up to the request deadline: with a live
    /// cluster nothing acknowledged is lost on the way out, and with a dead one the last
    /// holder of the disk (maybe a reactor core) does not hang.
    fn drop(&mut self) {
        let closed = Cluster { lib: self.cluster.lib, rados: null_mut(), ioctx: null_mut() };
        let (handle, cluster) = (SendHandle(self.handle), std::mem::replace(&mut self.cluster, closed));
        let (done, finished) = std::sync::mpsc::sync_channel::<()>(1);
        let close = move |(handle, cluster): (SendHandle, Cluster)| {
            // SAFETY: the handle came from rbd_open and no request of ours uses it any more.
            unsafe { (cluster.lib.rbd_close)(handle.0) };
            drop(cluster);
            let _ = done.send(());
        };
        let parts = std::sync::Arc::new(parking_lot::Mutex::new(Some((handle, cluster))));
        let for_thread = parts.clone();
        let spawned = std::thread::Builder::new()
            .name("tandem-rbd-close".into())
            .spawn(move || for_thread.lock().take().into_iter().for_each(close));
        match spawned {
            Ok(_) => {
                if finished.recv_timeout(self.close_wait).is_err() {
                    eprintln!(
                        "tandem: an rbd image did not close in {:?}; left to close in the background",
                        self.close_wait
                    );
                }
            }
            Err(error) => {
                // Never shut the cluster handle down under an open image: leak both instead.
                eprintln!("tandem: cannot start a thread to close an rbd image ({error}); it stays open");
                std::mem::forget(parts.lock().take());
            }
        }
    }
}

/// An image handle on its way to the closing thread.
struct SendHandle(ImageT);

// SAFETY: see Image.
unsafe impl Send for SendHandle {}

fn cstring(value: &str) -> std::result::Result<CString, RbdError> {
    CString::new(value).map_err(|_| RbdError::Nul { value: value.to_string() })
}

/// Connect to the spec's cluster and open its pool (and namespace).
fn connect(spec: &RbdSpec, options: &RbdOptions) -> std::result::Result<Cluster, RbdError> {
    let lib = lib()?;
    let user = spec.user.clone().unwrap_or_else(|| "admin".to_string());
    let conf = spec.conf_path.as_ref().map(|path| path.to_string_lossy().into_owned());
    if let Some(path) = &conf {
        // librados says only "not found" for any conf it cannot use: name the file and why.
        std::fs::File::open(path)
            .map_err(|error| RbdError::Conf { path: path.clone(), errno: error.raw_os_error().unwrap_or(libc::EIO) })?;
    }
    let user_c = cstring(&user)?;
    let mut rados: RadosT = null_mut();
    // SAFETY: rados points at a handle slot; user_c lives across the call.
    let created = unsafe { (lib.rados_create)(&mut rados, user_c.as_ptr()) };
    let connect_error = |errno: i32| RbdError::Connect {
        user: user.clone(),
        conf: conf.clone().unwrap_or_else(|| "librados' default search".into()),
        errno,
    };
    if created < 0 {
        return Err(connect_error(-created));
    }
    // From here the handle is shut down on every path out (Cluster's drop).
    let mut cluster = Cluster { lib, rados, ioctx: null_mut() };
    configure(&cluster, spec, conf.as_deref(), options)?;
    // SAFETY: a created, configured, not yet connected handle.
    let connected = unsafe { (lib.rados_connect)(cluster.rados) };
    if connected < 0 {
        return Err(connect_error(-connected));
    }
    let pool_c = cstring(&spec.pool)?;
    // SAFETY: a connected handle, a NUL-terminated name and a slot for the context.
    let opened = unsafe { (lib.rados_ioctx_create)(cluster.rados, pool_c.as_ptr(), &mut cluster.ioctx) };
    if opened < 0 {
        cluster.ioctx = null_mut();
        return Err(RbdError::Pool { pool: spec.pool.clone(), errno: -opened });
    }
    if let Some(namespace) = &spec.namespace {
        let namespace_c = cstring(namespace)?;
        // SAFETY: a live ioctx and a NUL-terminated name (copied by librados).
        unsafe { (lib.rados_ioctx_set_namespace)(cluster.ioctx, namespace_c.as_ptr()) };
    }
    Ok(cluster)
}

/// The conf file, the timeouts, then the spec's own options (which may override them).
fn configure(
    cluster: &Cluster,
    spec: &RbdSpec,
    conf: Option<&str>,
    options: &RbdOptions,
) -> std::result::Result<(), RbdError> {
    let lib = cluster.lib;
    let conf_c = conf.map(cstring).transpose()?;
    let conf_ptr = conf_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: a created handle and a NUL-terminated path or NULL (librados' search path).
    let read = unsafe { (lib.rados_conf_read_file)(cluster.rados, conf_ptr) };
    // Without a named conf, a missing default is fine: the options may carry mon_host.
    if read < 0 && conf.is_some() {
        return Err(RbdError::Conf { path: conf.unwrap_or_default().to_string(), errno: -read });
    }
    let timeout = options.op_timeout_s.to_string();
    let timeouts = ["rados_osd_op_timeout", "rados_mon_op_timeout", "client_mount_timeout"];
    // The objecter blocks the submitting thread (a core) when its own budget is spent: make
    // it larger than anything the driver's slots let in.
    let inflight_bytes = (options.inflight_max as u64).saturating_mul(tandem::block::MAX_REQUEST_BYTES).to_string();
    let inflight_ops = (options.inflight_max as u64).saturating_mul(OBJECTS_PER_REQUEST_MAX).to_string();
    let throttles = [("objecter_inflight_op_bytes", inflight_bytes), ("objecter_inflight_ops", inflight_ops)];
    let settings = timeouts
        .iter()
        .map(|key| (key.to_string(), timeout.clone()))
        .chain(throttles.into_iter().map(|(key, value)| (key.to_string(), value)))
        .chain(spec.options.iter().cloned());
    for (key, value) in settings {
        let (key_c, value_c) = (cstring(&key)?, cstring(&value)?);
        // SAFETY: a created handle and two NUL-terminated strings (copied by librados).
        let set = unsafe { (lib.rados_conf_set)(cluster.rados, key_c.as_ptr(), value_c.as_ptr()) };
        if set < 0 {
            let reason = match -set {
                libc::ENOENT => "librados knows no such option".to_string(),
                errno => errno_text(errno),
            };
            return Err(RbdError::Option { value: spec::redact(&key, &value), key, reason });
        }
    }
    Ok(())
}

/// The most RADOS objects one request spans: the largest request over the smallest object
/// size librbd allows (4 KiB), plus the two partial ends.
const OBJECTS_PER_REQUEST_MAX: u64 = tandem::block::MAX_REQUEST_BYTES / 4096 + 2;

/// Create an image of `size_bytes` (librbd's default features and object size), as
/// `rbd create` would.
pub fn create_image(spec: &RbdSpec, size_bytes: u64) -> std::result::Result<(), RbdError> {
    let cluster = connect(spec, &RbdOptions::default())?;
    let name_c = cstring(&spec.image)?;
    let mut order: libc::c_int = 0;
    // SAFETY: a live ioctx, a NUL-terminated name, and order 0 (librbd's default object size).
    let created = unsafe { (cluster.lib.rbd_create)(cluster.ioctx, name_c.as_ptr(), size_bytes, &mut order) };
    if created < 0 {
        return Err(RbdError::Create { image: spec.image_path(), size_bytes, errno: -created });
    }
    Ok(())
}

/// Remove an image (and its data), as `rbd rm` would.
pub fn remove_image(spec: &RbdSpec) -> std::result::Result<(), RbdError> {
    let cluster = connect(spec, &RbdOptions::default())?;
    let name_c = cstring(&spec.image)?;
    // SAFETY: a live ioctx and a NUL-terminated name.
    let removed = unsafe { (cluster.lib.rbd_remove)(cluster.ioctx, name_c.as_ptr()) };
    if removed < 0 {
        return Err(RbdError::Image { image: spec.image_path(), errno: -removed });
    }
    Ok(())
}

/// A Ceph RBD image behind the [`BlockDriver`] trait.
pub struct RbdDriver {
    name: String,
    image: Arc<Image>,
    size_bytes: u64,
    read_only: bool,
    slots: Arc<Slots>,
    /// How long a request may take, slot wait included (see [`REPLY_GRACE`]).
    deadline: Duration,
    watchdog: Watchdog,
    status: StatusThread,
}

/// Added to the op timeout for the driver's own deadline: librados' timeout should fire first
/// and say which operation failed; the deadline catches what librbd holds back itself (I/O it
/// queues while it re-acquires the exclusive lock from a cluster that does not answer).
const REPLY_GRACE: Duration = Duration::from_secs(5);

impl RbdDriver {
    /// Open the image `spec` names (QEMU's `rbd:` spelling: see [`RbdSpec::parse`]).
    ///
    /// ```no_run
    /// use tandem_drivers::rbd::{RbdDriver, RbdOptions};
    /// let disk = RbdDriver::open_spec("rbd:vms/disk1:conf=/etc/ceph/ceph.conf", &RbdOptions::default())?;
    /// # Ok::<(), tandem_drivers::rbd::RbdError>(())
    /// ```
    pub fn open_spec(spec: &str, options: &RbdOptions) -> std::result::Result<RbdDriver, RbdError> {
        RbdDriver::open(&RbdSpec::parse(spec)?, options)
    }

    /// Open the image a typed spec names.
    pub fn open(spec: &RbdSpec, options: &RbdOptions) -> std::result::Result<RbdDriver, RbdError> {
        options.validate()?;
        let cluster = connect(spec, options)?;
        let lib = cluster.lib;
        let read_only = options.read_only || spec.snapshot.is_some();
        let name_c = cstring(&spec.image)?;
        let snap_c = spec.snapshot.as_deref().map(cstring).transpose()?;
        let snap_ptr = snap_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        let open = if read_only { lib.rbd_open_read_only } else { lib.rbd_open };
        let mut handle: ImageT = null_mut();
        // SAFETY: a live ioctx, NUL-terminated names (or NULL: no snapshot) and a handle slot.
        let opened = unsafe { open(cluster.ioctx, name_c.as_ptr(), &mut handle, snap_ptr) };
        if opened < 0 {
            return Err(RbdError::Image { image: spec.image_path(), errno: -opened });
        }
        let deadline = Duration::from_secs(options.op_timeout_s.into()) + REPLY_GRACE;
        let image = Arc::new(Image { handle, cluster, close_wait: deadline });
        let mut size_bytes = 0u64;
        // SAFETY: an open image and a slot for its size.
        let sized = unsafe { (lib.rbd_get_size)(image.handle, &mut size_bytes) };
        if sized < 0 {
            return Err(RbdError::Image { image: spec.image_path(), errno: -sized });
        }
        let watchdog =
            Watchdog::start().map_err(|error| RbdError::Thread { what: "watchdog", detail: error.to_string() })?;
        Ok(RbdDriver {
            name: format!("rbd:{}", spec.image_path()),
            status: StatusThread::start(image.clone(), size_bytes, deadline),
            image,
            size_bytes,
            read_only,
            slots: Slots::new(options.inflight_max),
            deadline,
            watchdog,
        })
    }

    /// Run `submit` (a librbd aio call given the completion and the buffer's address) for a
    /// request holding `buf`, once a slot is free; the result and the buffer when librbd is
    /// done. A request not answered by its deadline fails with ETIMEDOUT and hands back a
    /// fresh buffer like the caller's: librbd keeps the original (and the slot) until it
    /// answers, and a write that timed out may still land: `hold` lives until then too.
    fn request(
        &self,
        buf: Option<AlignedBuf>,
        hold: Option<DeviceHold>,
        submit: impl FnOnce(&'static Lib, ImageT, CompletionT, *mut u8) -> libc::c_int + Send + 'static,
    ) -> impl Future<Output = (std::result::Result<isize, i32>, Option<AlignedBuf>)> + Send + 'static {
        let (image, slots, watch, deadline) =
            (self.image.clone(), self.slots.clone(), self.watchdog.handle(), self.deadline);
        // The deadline runs from the first poll: a FUA write's flush is made with the write
        // but starts after it.
        async move {
            let request = Request::new(buf, Instant::now() + deadline, hold);
            let weak: std::sync::Weak<dyn Expiring> = Arc::downgrade(&request) as _;
            watch.watch(weak);
            if request.take_slot(&slots).await.is_none() {
                return (Err(EXPIRED), request.take_buf());
            }
            if let Err(errno) = request.submit(image.cluster.lib, image.handle, submit) {
                return (Err(errno), request.take_buf());
            }
            let result = request.wait().await;
            (result, request.take_buf())
        }
    }
}

/// Turn a request's outcome into the driver's result for `op` at `offset`.
fn outcome(op: &'static str, offset: u64, result: std::result::Result<isize, i32>) -> Result<isize> {
    result.map_err(|errno| Error::Io { op, offset, errno })
}

impl BlockDriver for RbdDriver {
    fn name(&self) -> &str {
        &self.name
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn alignment(&self) -> Alignment {
        // librbd takes any byte range; 512 keeps requests in sectors, as QEMU's rbd does.
        Alignment { request_bytes: 512, memory_bytes: 512 }
    }

    fn capabilities(&self) -> Capabilities {
        // FUA is a write and a flush here (see `write`), not the device's own.
        Capabilities { read_only: self.read_only, fua: false, write_zeroes: true, discard: true, block_status: true }
    }

    fn read(&self, offset: u64, buf: AlignedBuf, _priority: IoPriority) -> IoFuture<BufResult<()>> {
        let length_bytes = buf.len();
        let request = self.request(Some(buf), None, move |lib, image, completion, ptr| {
            // SAFETY: ptr addresses length_bytes of the request's own buffer, alive until done.
            unsafe { (lib.rbd_aio_read)(image, offset, length_bytes, ptr.cast(), completion) }
        });
        IoFuture::boxed(async move {
            let (result, buf) = request.await;
            let buf = buf.expect("a read's buffer comes back");
            let result = outcome("read", offset, result).and_then(|done| match done as usize == length_bytes {
                true => Ok(()),
                false => Err(Error::ShortTransfer {
                    op: "read",
                    offset,
                    done_bytes: done as u64,
                    length_bytes: length_bytes as u64,
                }),
            });
            (result, buf)
        })
    }

    fn write(&self, offset: u64, buf: AlignedBuf, flags: WriteFlags, _priority: IoPriority) -> IoFuture<BufResult<()>> {
        if self.read_only {
            return IoFuture::ready((Err(Error::ReadOnly { op: "write", name: self.name.clone() }), buf));
        }
        let length_bytes = buf.len();
        let hold = DeviceHold::new();
        let request = self.request(Some(buf), Some(hold.clone()), move |lib, image, completion, ptr| {
            // SAFETY: as for read; librbd copies nothing back into the buffer.
            unsafe { (lib.rbd_aio_write2)(image, offset, length_bytes, ptr.cast_const().cast(), completion, 0) }
        });
        // librbd's cache (write-around by default) may complete a write before an OSD has it,
        // and whether it honours a FUA hint depends on the cache policy: a FUA write is a
        // write and then a flush, as QEMU emulates FUA for drivers without it.
        let flush = flags.fua.then(|| self.flush(IoPriority::GUEST));
        let write = async move {
            let (result, buf) = request.await;
            let mut result = outcome("write", offset, result).map(drop);
            if let (Ok(()), Some(flush)) = (&result, flush) {
                result = flush.await;
            }
            (result, buf.expect("a write's buffer comes back"))
        };
        IoFuture::boxed_with_hold(write, &hold)
    }

    fn flush(&self, _priority: IoPriority) -> IoFuture<Result<()>> {
        let request = self.request(None, None, |lib, image, completion, _| {
            // SAFETY: an open image and a fresh completion.
            unsafe { (lib.rbd_aio_flush)(image, completion) }
        });
        IoFuture::boxed(async move { outcome("flush", 0, request.await.0).map(drop) })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        length_bytes: u64,
        may_unmap: bool,
        _priority: IoPriority,
    ) -> IoFuture<Result<()>> {
        if self.read_only {
            return IoFuture::ready(Err(Error::ReadOnly { op: "write_zeroes", name: self.name.clone() }));
        }
        // Thick provisioning writes real zeros; without it librbd may deallocate the range.
        let zero_flags = if may_unmap { 0 } else { THICK_PROVISION };
        let hold = DeviceHold::new();
        let request = self.request(None, Some(hold.clone()), move |lib, image, completion, _| {
            // SAFETY: an open image and a fresh completion; no buffer involved.
            unsafe { (lib.rbd_aio_write_zeroes)(image, offset, length_bytes as usize, completion, zero_flags, 0) }
        });
        IoFuture::boxed_with_hold(async move { outcome("write_zeroes", offset, request.await.0).map(drop) }, &hold)
    }

    fn discard(&self, offset: u64, length_bytes: u64, _priority: IoPriority) -> IoFuture<Result<()>> {
        if self.read_only {
            return IoFuture::ready(Err(Error::ReadOnly { op: "discard", name: self.name.clone() }));
        }
        let hold = DeviceHold::new();
        let request = self.request(None, Some(hold.clone()), move |lib, image, completion, _| {
            // SAFETY: an open image and a fresh completion; no buffer involved.
            unsafe { (lib.rbd_aio_discard)(image, offset, length_bytes, completion) }
        });
        IoFuture::boxed_with_hold(async move { outcome("discard", offset, request.await.0).map(drop) }, &hold)
    }

    fn block_status(&self, offset: u64, length_bytes: u64) -> IoFuture<Result<Extent>> {
        IoFuture::boxed(self.status.query(&self.watchdog.handle(), offset, length_bytes))
    }
}

/// `RBD_WRITE_ZEROES_FLAG_THICK_PROVISION`.
const THICK_PROVISION: libc::c_int = 1;
