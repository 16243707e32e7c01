//! The metric write-ahead log of a run: one JSON object per line in
//! `<run dir>/metrics.wal`, appended by the trainer before anything else sees a
//! metric, and read from a byte offset by whatever ships metrics elsewhere.
//!
//! Guarantees:
//! - A crash (even `kill -9`) loses at most the line being written; a torn last
//!   line is cut off when the log is opened again, never parsed.
//! - A `(key, step)` pair is recorded once: after a resume the trainer recomputes
//!   steps it had already logged, and those records are skipped, so shippers
//!   never see a step twice.
//! - Records keep the timestamp taken when they were logged, so sending one
//!   twice (a lost response) sends an identical metric, which MLflow stores once.

use anyhow::{Context, Result, bail};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// File name of the metric log inside a run directory.
pub const WAL_FILE: &str = "metrics.wal";

pub use crate::mlflow::api::{MetricRecord, now_millis};

/// The append side of a run's metric log.
pub struct MetricWal {
    path: PathBuf,
    file: File,
    last_step: HashMap<String, i64>,
    len: u64,
}

impl MetricWal {
    /// Open (or create) `<run_dir>/metrics.wal`, cutting off a torn last line and
    /// remembering the last step logged for every key.
    pub fn open(run_dir: impl AsRef<Path>) -> Result<Self> {
        let path = run_dir.as_ref().join(WAL_FILE);
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open the metric log {}", path.display()))?;
        let mut last_step = HashMap::new();
        let mut good = 0u64;
        {
            let mut reader = BufReader::new(&mut file);
            reader.seek(SeekFrom::Start(0))?;
            let mut line = String::new();
            let mut lineno = 0usize;
            loop {
                line.clear();
                let n = reader.read_line(&mut line)?;
                if n == 0 || !line.ends_with('\n') {
                    break;
                }
                lineno += 1;
                let rec: MetricRecord = serde_json::from_str(line.trim_end()).with_context(|| {
                    format!("{}:{lineno}: not a metric record; the log is damaged (move it aside to start a fresh one)", path.display())
                })?;
                let e = last_step.entry(rec.key).or_insert(i64::MIN);
                *e = (*e).max(rec.step);
                good += n as u64;
            }
        }
        let total = file.metadata()?.len();
        if total > good {
            file.set_len(good).with_context(|| format!("cannot cut the torn last line of {}", path.display()))?;
        }
        Ok(MetricWal { path, file, last_step, len: good })
    }

    /// Path of the log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of complete records in the log.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when nothing has been logged.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The last step logged for `key`, if any.
    pub fn last_step(&self, key: &str) -> Option<i64> {
        self.last_step.get(key).copied()
    }

    /// Append records, skipping any whose step is not after the last step already
    /// logged for its key. Returns how many were written. The bytes reach the
    /// operating system before this returns (they survive a process crash); call
    /// [`MetricWal::sync`] to also survive a power loss.
    pub fn append(&mut self, records: &[MetricRecord]) -> Result<usize> {
        let mut buf = Vec::with_capacity(records.len() * 80);
        let mut written = 0;
        for r in records {
            if !r.key.is_empty() && self.last_step.get(&r.key).is_some_and(|&s| r.step <= s) {
                continue;
            }
            if r.key.is_empty() {
                bail!("a metric needs a name (got an empty key at step {})", r.step);
            }
            serde_json::to_writer(&mut buf, r)?;
            buf.push(b'\n');
            self.last_step.insert(r.key.clone(), r.step);
            written += 1;
        }
        if !buf.is_empty() {
            self.file.write_all(&buf).with_context(|| format!("cannot append to {}", self.path.display()))?;
            self.len += buf.len() as u64;
        }
        Ok(written)
    }

    /// Flush the log to stable storage.
    pub fn sync(&mut self) -> Result<()> {
        self.file.sync_data().with_context(|| format!("cannot sync {}", self.path.display()))
    }
}

/// Read complete records of `<run_dir>/metrics.wal` starting at byte `offset`,
/// at most `max` of them. Returns the records and the offset just after the last
/// one returned. A missing log reads as empty; a torn last line is not returned.
pub fn read_from(run_dir: impl AsRef<Path>, offset: u64, max: usize) -> Result<(Vec<MetricRecord>, u64)> {
    let path = run_dir.as_ref().join(WAL_FILE);
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), offset)),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    file.seek(SeekFrom::Start(offset))?;
    let mut reader = BufReader::new(file.take(u64::MAX));
    let mut out = Vec::new();
    let mut pos = offset;
    let mut line = String::new();
    while out.len() < max {
        line.clear();
        let n = reader.read_line(&mut line)?;
        if n == 0 || !line.ends_with('\n') {
            break;
        }
        let rec: MetricRecord = serde_json::from_str(line.trim_end())
            .with_context(|| format!("{} at byte {pos}: not a metric record", path.display()))?;
        out.push(rec);
        pos += n as u64;
    }
    Ok((out, pos))
}

/// A persisted byte offset into the metric log: how far a shipper has delivered.
/// Stored in `<run_dir>/<name>` and replaced atomically.
pub struct WalCursor {
    path: PathBuf,
}

impl WalCursor {
    /// The cursor named `name` (e.g. `mlflow.cursor`) in `run_dir`.
    pub fn new(run_dir: impl AsRef<Path>, name: &str) -> Self {
        WalCursor { path: run_dir.as_ref().join(name) }
    }

    /// The stored offset, 0 when none is stored yet.
    pub fn load(&self) -> Result<u64> {
        match std::fs::read_to_string(&self.path) {
            Ok(s) => s
                .trim()
                .parse()
                .with_context(|| format!("{} does not hold a byte offset (found {s:?})", self.path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", self.path.display())),
        }
    }

    /// Store `offset` (temp file + rename).
    pub fn store(&self, offset: u64) -> Result<()> {
        crate::files::write_atomic(&self.path, offset.to_string().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_tail_is_cut_and_steps_are_not_logged_twice() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = MetricWal::open(dir.path()).unwrap();
        let recs: Vec<_> = (0..5).map(|s| MetricRecord { key: "loss".into(), value: s as f64, step: s, timestamp: 10 + s }).collect();
        assert_eq!(wal.append(&recs).unwrap(), 5);
        drop(wal);
        // A crash mid-write leaves half a line.
        let mut f = OpenOptions::new().append(true).open(dir.path().join(WAL_FILE)).unwrap();
        f.write_all(b"{\"key\":\"loss\",\"val").unwrap();
        drop(f);
        let mut wal = MetricWal::open(dir.path()).unwrap();
        assert_eq!(wal.last_step("loss"), Some(4));
        // A resume recomputes steps 3..7: only 5..7 are new.
        let again: Vec<_> = (3..8).map(|s| MetricRecord::now("loss", s as f64, s)).collect();
        assert_eq!(wal.append(&again).unwrap(), 3);
        let (all, end) = read_from(dir.path(), 0, usize::MAX).unwrap();
        assert_eq!(all.iter().map(|r| r.step).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(end, wal.len());
        let (tail, _) = read_from(dir.path(), 0, 3).unwrap();
        assert_eq!(tail.len(), 3);
    }

    #[test]
    fn non_finite_values_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = MetricWal::open(dir.path()).unwrap();
        wal.append(&[
            MetricRecord::now("a", f64::NAN, 1),
            MetricRecord::now("b", f64::INFINITY, 1),
            MetricRecord::now("c", f64::NEG_INFINITY, 1),
        ])
        .unwrap();
        let (r, _) = read_from(dir.path(), 0, 10).unwrap();
        assert!(r[0].value.is_nan());
        assert_eq!(r[1].value, f64::INFINITY);
        assert_eq!(r[2].value, f64::NEG_INFINITY);
        let c = WalCursor::new(dir.path(), "x.cursor");
        assert_eq!(c.load().unwrap(), 0);
        c.store(123).unwrap();
        assert_eq!(c.load().unwrap(), 123);
    }
}
