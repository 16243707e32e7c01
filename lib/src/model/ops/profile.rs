//! Opt-in timing of the fused ops (`TUNEBOOK_PROFILE=1`), to see where a training step goes.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

static TABLE: Mutex<Option<HashMap<&'static str, (f64, u64)>>> = Mutex::new(None);

/// Whether timing is on (`TUNEBOOK_PROFILE=1`).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| matches!(std::env::var("TUNEBOOK_PROFILE").as_deref(), Ok("1") | Ok("true")))
}

/// Adds the time until drop to the entry `name`.
pub struct Timer(&'static str, Instant);

impl Drop for Timer {
    fn drop(&mut self) {
        let dt = self.1.elapsed().as_secs_f64();
        let mut t = TABLE.lock().unwrap_or_else(|e| e.into_inner());
        let e = t.get_or_insert_with(HashMap::new).entry(self.0).or_insert((0.0, 0));
        e.0 += dt;
        e.1 += 1;
    }
}

/// A timer for `name` when profiling is on.
pub fn timer(name: &'static str) -> Option<Timer> {
    enabled().then(|| Timer(name, Instant::now()))
}

/// Accumulated `(name, seconds, calls)`, slowest first; clears the table.
pub fn take() -> Vec<(&'static str, f64, u64)> {
    let mut t = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<_> = t.take().unwrap_or_default().into_iter().map(|(k, (s, n))| (k, s, n)).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}
