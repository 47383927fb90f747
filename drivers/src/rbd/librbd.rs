//! librados and librbd, loaded at run time so that the default build, the other drivers and
//! users without Ceph never need Ceph's libraries: the symbols the driver calls, resolved once
//! per process, and the typed error when a library is missing.
//!
//! No maintained crate binds librbd (the `ceph` crate covers librados only), and the driver
//! needs about twenty functions whose C signatures are stable since Ceph 15, so they are
//! declared here, as `rbd/librbd.h` and `rados/librados.h` give them.

use super::RbdError;
use libc::{c_char, c_int, c_void, size_t, ssize_t};
use std::sync::OnceLock;

pub(crate) type RadosT = *mut c_void;
pub(crate) type IoctxT = *mut c_void;
pub(crate) type ImageT = *mut c_void;
pub(crate) type CompletionT = *mut c_void;
pub(crate) type Callback = extern "C" fn(CompletionT, *mut c_void);
pub(crate) type DiffCallback = extern "C" fn(u64, size_t, c_int, *mut c_void) -> c_int;

/// The Debian packages that carry the libraries (named in the error when one is missing).
const RADOS: (&str, &str) = ("librados.so.2", "librados2");
const RBD: (&str, &str) = ("librbd.so.1", "librbd1");

macro_rules! symbols {
    ($($lib:ident { $($name:ident: fn($($arg:ty),*) -> $ret:ty;)* })*) => {
        /// Every function the driver calls, with the libraries that hold them kept loaded.
        pub(crate) struct Lib {
            _libraries: Vec<libloading::Library>,
            $($(pub(crate) $name: unsafe extern "C" fn($($arg),*) -> $ret,)*)*
        }

        impl Lib {
            fn load() -> Result<Lib, RbdError> {
                $(let $lib = open(stringify!($lib))?;)*
                Ok(Lib {
                    $($($name: symbol(&$lib, stringify!($lib), stringify!($name))?,)*)*
                    _libraries: vec![$($lib),*],
                })
            }
        }
    };
}

symbols! {
    rados {
        rados_create: fn(*mut RadosT, *const c_char) -> c_int;
        rados_conf_read_file: fn(RadosT, *const c_char) -> c_int;
        rados_conf_set: fn(RadosT, *const c_char, *const c_char) -> c_int;
        rados_connect: fn(RadosT) -> c_int;
        rados_shutdown: fn(RadosT) -> ();
        rados_ioctx_create: fn(RadosT, *const c_char, *mut IoctxT) -> c_int;
        rados_ioctx_destroy: fn(IoctxT) -> ();
        rados_ioctx_set_namespace: fn(IoctxT, *const c_char) -> ();
    }
    rbd {
        rbd_create: fn(IoctxT, *const c_char, u64, *mut c_int) -> c_int;
        rbd_remove: fn(IoctxT, *const c_char) -> c_int;
        rbd_open: fn(IoctxT, *const c_char, *mut ImageT, *const c_char) -> c_int;
        rbd_open_read_only: fn(IoctxT, *const c_char, *mut ImageT, *const c_char) -> c_int;
        rbd_close: fn(ImageT) -> c_int;
        rbd_get_size: fn(ImageT, *mut u64) -> c_int;
        rbd_diff_iterate2: fn(ImageT, *const c_char, u64, u64, u8, u8, DiffCallback, *mut c_void) -> c_int;
        rbd_aio_create_completion: fn(*mut c_void, Callback, *mut CompletionT) -> c_int;
        rbd_aio_get_return_value: fn(CompletionT) -> ssize_t;
        rbd_aio_release: fn(CompletionT) -> ();
        rbd_aio_read: fn(ImageT, u64, size_t, *mut c_char, CompletionT) -> c_int;
        rbd_aio_write2: fn(ImageT, u64, size_t, *const c_char, CompletionT, c_int) -> c_int;
        rbd_aio_discard: fn(ImageT, u64, u64, CompletionT) -> c_int;
        rbd_aio_write_zeroes: fn(ImageT, u64, size_t, CompletionT, c_int, c_int) -> c_int;
        rbd_aio_flush: fn(ImageT, CompletionT) -> c_int;
    }
}

/// The libraries, loaded on first use; the same error for every caller if they are missing.
pub(crate) fn lib() -> Result<&'static Lib, RbdError> {
    static LIB: OnceLock<Result<Lib, RbdError>> = OnceLock::new();
    LIB.get_or_init(Lib::load).as_ref().map_err(Clone::clone)
}

fn open(short_name: &str) -> Result<libloading::Library, RbdError> {
    open_library(if short_name == "rados" { RADOS } else { RBD })
}

fn open_library((library, package): (&'static str, &'static str)) -> Result<libloading::Library, RbdError> {
    // SAFETY: loading runs the library's initialisers; librados and librbd are ordinary C++
    // libraries whose initialisers only set up their own statics.
    unsafe { libloading::Library::new(library) }.map_err(|error| RbdError::LibraryMissing {
        library,
        package,
        detail: error.to_string(),
    })
}

fn symbol<T: Copy>(
    library: &libloading::Library,
    library_name: &'static str,
    name: &'static str,
) -> Result<T, RbdError> {
    let mut with_nul = name.as_bytes().to_vec();
    with_nul.push(0);
    // SAFETY: T is the function's C signature as the library's header declares it.
    let found = unsafe { library.get::<T>(&with_nul) };
    found.map(|symbol| *symbol).map_err(|error| RbdError::Symbol {
        library: library_name,
        symbol: name,
        detail: error.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_named_with_its_package() {
        let error = open_library(("libtandem-no-such.so.1", "tandem-no-such1")).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, RbdError::LibraryMissing { .. }), "{error:?}");
        assert!(
            message.contains("libtandem-no-such.so.1") && message.contains("apt-get install tandem-no-such1"),
            "{message}"
        );
    }
}
