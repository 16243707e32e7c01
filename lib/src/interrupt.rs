//! Cooperative interruption of long-running library calls.
//!
//! In `tunebook-kernel`, the process that runs notebook cells starts with SIGINT
//! *blocked*. When the user presses "interrupt", the kernel sends SIGINT, which
//! stays pending until a library loop calls [`check`] (training, generation,
//! waiting on a run, [`sleep`]). `check` consumes the signal and returns
//! [`Interrupted`]; library calls turn that into an error (or a panic in code that
//! cannot return one), which evcxr catches, so variables defined in earlier cells
//! survive. Code that never calls `check` is stopped by the kernel the hard way
//! after a grace period.
//!
//! The pending-signal set is process state kept by the OS, not a Rust `static`, so
//! this works even though evcxr links a fresh copy of the library into every cell.
//! In an ordinary process (SIGINT not blocked) [`check`] never reports anything and
//! Ctrl-C behaves as usual.

use std::time::{Duration, Instant};

/// The user asked to stop (notebook "interrupt").
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("interrupted by the user")]
pub struct Interrupted;

/// Returns true (once) if an interrupt is pending, consuming it.
pub fn requested() -> bool {
    #[cfg(unix)]
    // SAFETY: plain libc signal-set calls on stack-allocated sets.
    unsafe {
        let mut pending: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut pending);
        if libc::sigpending(&mut pending) != 0 || libc::sigismember(&pending, libc::SIGINT) != 1 {
            return false;
        }
        let mut only: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut only);
        libc::sigaddset(&mut only, libc::SIGINT);
        let zero = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        libc::sigtimedwait(&only, std::ptr::null_mut(), &zero) == libc::SIGINT
    }
    #[cfg(not(unix))]
    false
}

/// `Err(Interrupted)` if the user asked to stop since the last check.
pub fn check() -> Result<(), Interrupted> {
    if requested() { Err(Interrupted) } else { Ok(()) }
}

/// Sleeps for `d`, returning early with `Err(Interrupted)` if interrupted.
pub fn sleep(d: Duration) -> Result<(), Interrupted> {
    let end = Instant::now() + d;
    loop {
        check()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(20)));
    }
}

/// Blocks SIGINT for the calling thread and threads it starts later. The kernel
/// calls this at the start of the process that runs cells.
#[cfg(unix)]
pub fn block_sigint() {
    // SAFETY: signal mask manipulation with a valid, initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn pending_sigint_is_seen_once_when_blocked() {
        // Run in a child thread so the mask change stays local to this test.
        std::thread::spawn(|| {
            block_sigint();
            assert!(!requested());
            // SAFETY: sending a signal to our own thread.
            unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGINT) };
            assert!(requested());
            assert!(!requested(), "the signal is consumed");
            unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGINT) };
            assert_eq!(sleep(Duration::from_secs(30)), Err(Interrupted));
        })
        .join()
        .unwrap();
    }
}
