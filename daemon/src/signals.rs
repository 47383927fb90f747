//! SIGTERM and SIGINT: blocked in every thread (set before the engine starts its threads,
//! which inherit the mask) and taken synchronously by the main thread with sigwait, so the
//! shutdown runs as ordinary code, not in a handler. A second signal exits at once.

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise a set on the stack.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// Block the two signals in the calling thread and every thread it starts from now on.
pub(crate) fn block_termination() {
    let set = termination_set();
    // SAFETY: changes this thread's signal mask from a valid set.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

fn wait() -> i32 {
    let set = termination_set();
    let mut signal = 0;
    // SAFETY: sigwait reads a valid set and writes one int; the signals are blocked.
    unsafe { libc::sigwait(&set, &mut signal) };
    signal
}

/// Wait for the first SIGTERM or SIGINT; from then on a second one exits the process.
pub(crate) fn wait_for_termination() {
    let signal = wait();
    let name = if signal == libc::SIGINT { "SIGINT" } else { "SIGTERM" };
    tandem::log::line(&format!("{name}: shutting down (send it again to exit at once)"));
    std::thread::spawn(|| {
        wait();
        tandem::log::line("second signal: exiting without a clean shutdown");
        std::process::exit(1);
    });
}
