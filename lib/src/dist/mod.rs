//! Processes that train one run together: who they are and how they talk.
//!
//! A launcher starts N copies of `tunebook train` (ranks). [`Launch::detect`] reads
//! which launcher it was from the environment it sets: `mpirun` (MPICH's
//! `PMI_RANK`/`PMI_SIZE`, Open MPI's `OMPI_COMM_WORLD_*`), Slurm's `srun`
//! (`SLURM_PROCID`, `SLURM_STEP_NUM_TASKS`), or `torchrun` / Kubeflow Trainer
//! (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`). Nothing set is
//! one process. Partial or contradictory variables are an error naming them.
//!
//! [`Dist`] is the one collective interface the trainer uses: sums across ranks
//! (`all_reduce_*`), a broadcast from rank 0, a barrier. Its backends:
//! - one process: every collective is a no-op, at no cost;
//! - MPI (`dist/mpi.rs`, the `mpi` crate over the system's MPICH or Open MPI):
//!   CPUs, and any launch `mpirun`/`srun` makes.
//!
//! A collective that does not complete within the timeout (a rank died, or a rank is
//! stuck) ends this process with a message naming the ranks it finds gone (those on
//! this host, checked by process id) instead of hanging: see [`Watchdog`]. The
//! launcher then stops the others.
//!
//! Must never: read or write run files, know about models or tensors (callers
//! flatten what they reduce into `f32`/`f64` slices), or start a launcher itself.

#[cfg(feature = "mpi")]
mod mpi;

use anyhow::{Result, anyhow, bail};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Exit code of a rank that gave up waiting on a collective.
pub const EXIT_COLLECTIVE_TIMEOUT: i32 = 75;

/// The default collective timeout; `TUNEBOOK_COLLECTIVE_TIMEOUT` (seconds) overrides it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// Which launcher started this process, as its environment says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launcher {
    /// No launcher variables: one process.
    Single,
    /// MPICH's `mpirun`/`mpiexec` (Hydra): `PMI_RANK`, `PMI_SIZE`.
    Mpich,
    /// Open MPI's `mpirun`: `OMPI_COMM_WORLD_RANK`, `OMPI_COMM_WORLD_SIZE`.
    OpenMpi,
    /// Slurm's `srun`: `SLURM_PROCID`, `SLURM_STEP_NUM_TASKS` (MPI is started through
    /// Slurm's PMI).
    Slurm,
    /// `torchrun`, Kubeflow Trainer's torch policy, or a PyTorchJob: `RANK`,
    /// `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`.
    Torchrun,
}

impl std::fmt::Display for Launcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Launcher::Single => "one process",
            Launcher::Mpich => "mpirun (MPICH)",
            Launcher::OpenMpi => "mpirun (Open MPI)",
            Launcher::Slurm => "srun (Slurm)",
            Launcher::Torchrun => "torchrun-style variables",
        })
    }
}

/// This process's place in the job, from the launcher's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// Who set the variables.
    pub launcher: Launcher,
    /// This process's rank, `0..world`.
    pub rank: usize,
    /// Number of processes.
    pub world: usize,
    /// Rank among the processes on this machine.
    pub local_rank: usize,
    /// Processes on this machine, when the launcher says.
    pub local_world: Option<usize>,
    /// `MASTER_ADDR:MASTER_PORT` for torchrun-style launches.
    pub master: Option<String>,
}

fn parse(env: &dyn Fn(&str) -> Option<String>, key: &str) -> Result<Option<usize>> {
    match env(key) {
        None => Ok(None),
        Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| anyhow!("launch variable {key}={v:?} is not a whole number")),
    }
}

fn required(env: &dyn Fn(&str) -> Option<String>, launcher: &str, set: &str, key: &str) -> Result<usize> {
    parse(env, key)?.ok_or_else(|| {
        anyhow!("{set} is set ({launcher}) but {key} is not: the launch is incomplete. Start tunebook with the launcher itself (mpirun -n N, srun, torchrun) rather than setting some of its variables by hand")
    })
}

impl Launch {
    /// One process, no launcher.
    pub fn single() -> Self {
        Launch { launcher: Launcher::Single, rank: 0, world: 1, local_rank: 0, local_world: Some(1), master: None }
    }

    /// Reads the launch from this process's environment.
    pub fn from_env() -> Result<Self> {
        Self::detect(&|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// Reads the launch from `env` (a variable lookup). MPI launchers win over Slurm
    /// (an `mpirun` inside an allocation sets both), Slurm over torchrun-style
    /// variables. An error names the variable that is missing, malformed or
    /// contradicts another.
    pub fn detect(env: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let launch = if let Some(rank) = parse(env, "OMPI_COMM_WORLD_RANK")? {
            Launch {
                launcher: Launcher::OpenMpi,
                rank,
                world: required(env, "Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")?,
                local_rank: parse(env, "OMPI_COMM_WORLD_LOCAL_RANK")?.unwrap_or(0),
                local_world: parse(env, "OMPI_COMM_WORLD_LOCAL_SIZE")?,
                master: None,
            }
        } else if let Some(rank) = parse(env, "PMI_RANK")? {
            Launch {
                launcher: Launcher::Mpich,
                rank,
                world: required(env, "MPICH", "PMI_RANK", "PMI_SIZE")?,
                local_rank: parse(env, "MPI_LOCALRANKID")?.unwrap_or(0),
                local_world: parse(env, "MPI_LOCALNRANKS")?,
                master: None,
            }
        } else if let Some(rank) = parse(env, "SLURM_PROCID")?.filter(|_| env("SLURM_STEP_NUM_TASKS").is_some()) {
            // Inside `sbatch`'s own script SLURM_PROCID is set but no job step is: that
            // is one process, whatever the allocation's size.
            Launch {
                launcher: Launcher::Slurm,
                rank,
                world: required(env, "Slurm", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS")?,
                local_rank: parse(env, "SLURM_LOCALID")?.unwrap_or(0),
                local_world: None,
                master: None,
            }
        } else if env("RANK").is_some() || env("WORLD_SIZE").is_some() {
            let set = if env("RANK").is_some() { "RANK" } else { "WORLD_SIZE" };
            let rank = required(env, "torchrun-style", set, "RANK")?;
            let world = required(env, "torchrun-style", set, "WORLD_SIZE")?;
            let local_rank = parse(env, "LOCAL_RANK")?.unwrap_or(0);
            let master = match (env("MASTER_ADDR"), env("MASTER_PORT")) {
                (Some(a), Some(p)) => {
                    p.parse::<u16>().map_err(|_| anyhow!("launch variable MASTER_PORT={p:?} is not a port number"))?;
                    Some(format!("{a}:{p}"))
                }
                (None, None) if world == 1 => None,
                (a, _) => bail!(
                    "RANK and WORLD_SIZE are set (torchrun-style) but {} is not: every rank needs MASTER_ADDR and MASTER_PORT to find rank 0",
                    if a.is_none() { "MASTER_ADDR" } else { "MASTER_PORT" }
                ),
            };
            Launch { launcher: Launcher::Torchrun, rank, world, local_rank, local_world: parse(env, "LOCAL_WORLD_SIZE")?, master }
        } else {
            Launch::single()
        };
        if launch.world == 0 {
            bail!("the launcher says the job has 0 processes ({})", launch.launcher);
        }
        if launch.rank >= launch.world {
            bail!("rank {} is not below the world size {} ({}): the launch variables contradict each other", launch.rank, launch.world, launch.launcher);
        }
        Ok(launch)
    }

    /// CPU threads this rank should use: the machine's, shared among the ranks on it.
    pub fn threads_per_rank(&self) -> usize {
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        (cpus / self.local_world.unwrap_or(1).max(1)).max(1)
    }
}

/// A communication backend: sums across ranks, a broadcast from rank 0, a barrier.
/// Every rank must make the same calls in the same order.
pub trait Collective: Send + Sync {
    /// Backend name for messages (`mpi`, `single`).
    fn name(&self) -> &'static str;
    /// Sums `buf` element-wise across ranks, in place, on every rank.
    fn all_reduce_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// Sums `buf` element-wise across ranks, in place, on every rank.
    fn all_reduce_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Rank 0's `buf` on every rank (any length).
    fn broadcast(&self, buf: &mut Vec<u8>) -> Result<()>;
    /// Every rank's `mine`, in rank order (any lengths).
    fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Waits until every rank arrives.
    fn barrier(&self) -> Result<()>;
}

/// The one-process backend: nothing to exchange.
struct Single;

impl Collective for Single {
    fn name(&self) -> &'static str {
        "single"
    }
    fn all_reduce_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![mine.to_vec()])
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// Where a rank runs, to name it when it is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its rank.
    pub rank: usize,
    /// Its process id.
    pub pid: u32,
    /// Its host name.
    pub host: String,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rank {} (pid {} on {})", self.rank, self.pid, self.host)
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "?".into())
}

/// What a process on this host is doing, as far as a peer can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcState {
    /// Running or waiting.
    Alive,
    /// Stopped by a signal (`SIGSTOP`, a debugger): it will never reach the collective.
    Stopped,
    /// Exited or killed.
    Gone,
}

fn proc_state(pid: u32) -> ProcState {
    // SAFETY: signal 0 only checks that the process exists.
    if unsafe { libc::kill(pid as i32, 0) } != 0 {
        return ProcState::Gone;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => match s.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()) {
            // A zombie has exited.
            Some('Z') | Some('X') => ProcState::Gone,
            Some('T') | Some('t') => ProcState::Stopped,
            _ => ProcState::Alive,
        },
        Err(_) => ProcState::Gone,
    }
}

/// Ends the process when a collective outlives its timeout.
///
/// One thread per process. A collective [`arm`](Watchdog::arm)s it with what it is
/// doing; if the guard is still held after the timeout, the thread prints which
/// collective waited, which ranks on this host are gone (by process id) and which
/// ranks it cannot check, then exits with [`EXIT_COLLECTIVE_TIMEOUT`]. MPI launchers
/// stop the remaining ranks when one exits.
pub struct Watchdog {
    state: Arc<(Mutex<Option<(String, Instant)>>, Condvar)>,
    timeout: Duration,
}

/// Disarms the watchdog when dropped.
pub struct Armed<'a>(&'a Watchdog);

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        let (lock, cv) = &*self.0.state;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = None;
        cv.notify_all();
    }
}

impl Watchdog {
    /// Starts the watchdog thread of `me` among `peers`.
    pub fn start(timeout: Duration, me: usize, peers: Arc<Mutex<Vec<Peer>>>) -> Self {
        let state: Arc<(Mutex<Option<(String, Instant)>>, Condvar)> = Arc::new((Mutex::new(None), Condvar::new()));
        let s = state.clone();
        std::thread::Builder::new()
            .name("tunebook-dist-watchdog".into())
            .spawn(move || {
                let (lock, cv) = &*s;
                let mut guard = lock.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    let wait = match &*guard {
                        None => Duration::from_secs(3600),
                        Some((what, since)) => {
                            let waited = since.elapsed();
                            if waited >= timeout {
                                let peers = peers.lock().map(|p| p.clone()).unwrap_or_default();
                                eprintln!("{}", timeout_message(me, what, waited, &peers, &host_name(), proc_state));
                                std::process::exit(EXIT_COLLECTIVE_TIMEOUT);
                            }
                            timeout - waited
                        }
                    };
                    guard = cv.wait_timeout(guard, wait).map(|(g, _)| g).unwrap_or_else(|e| e.into_inner().0);
                }
            })
            .expect("starting the collective watchdog thread");
        Watchdog { state, timeout }
    }

    /// Arms the watchdog for `what` until the returned guard drops.
    pub fn arm(&self, what: &str) -> Armed<'_> {
        let (lock, cv) = &*self.state;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = Some((what.to_string(), Instant::now()));
        cv.notify_all();
        Armed(self)
    }

    /// The timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// What a rank says when it gives up on a collective: the ranks on this host that
/// are gone, and those elsewhere it cannot check.
fn timeout_message(me: usize, what: &str, waited: Duration, peers: &[Peer], host: &str, state: impl Fn(u32) -> ProcState) -> String {
    let others: Vec<&Peer> = peers.iter().filter(|p| p.rank != me).collect();
    let local = |want: ProcState| -> Vec<String> { others.iter().filter(|p| p.host == host && state(p.pid) == want).map(|p| p.to_string()).collect() };
    let (gone, stopped) = (local(ProcState::Gone), local(ProcState::Stopped));
    let remote: Vec<String> = others.iter().filter(|p| p.host != host).map(|p| p.to_string()).collect();
    let mut msg = format!("rank {me}: {what} did not complete in {:.0} s (TUNEBOOK_COLLECTIVE_TIMEOUT): ", waited.as_secs_f64());
    if !gone.is_empty() {
        msg.push_str(&format!("{} exited; ", gone.join(", ")));
    }
    if !stopped.is_empty() {
        msg.push_str(&format!("{} is stopped (SIGSTOP or a debugger); ", stopped.join(", ")));
    }
    if gone.is_empty() && stopped.is_empty() && remote.is_empty() {
        msg.push_str("every other rank on this host is running, so one is stuck; ");
    }
    if !remote.is_empty() {
        msg.push_str(&format!("on other hosts, check {}; ", remote.join(", ")));
    }
    msg.push_str("this rank stops too. Resume the run with `tunebook train --run-dir RUN_DIR` (any number of ranks)");
    msg
}

/// The processes of one job and the backend that connects them.
pub struct Dist {
    launch: Launch,
    backend: Box<dyn Collective>,
    watchdog: Option<Watchdog>,
    peers: Arc<Mutex<Vec<Peer>>>,
}

impl Dist {
    /// One process: collectives cost nothing.
    pub fn single() -> Self {
        Dist {
            launch: Launch::single(),
            backend: Box::new(Single),
            watchdog: None,
            peers: Arc::new(Mutex::new(vec![Peer { rank: 0, pid: std::process::id(), host: host_name() }])),
        }
    }

    /// Joins the job the environment describes ([`Launch::from_env`]); one process
    /// when no launcher started this one. Under MPI, also sets this rank's CPU threads
    /// to its share of the machine unless `RAYON_NUM_THREADS` is set. Call it once,
    /// before any other thread pool starts.
    pub fn from_env() -> Result<Self> {
        let launch = Launch::from_env()?;
        Self::join(launch)
    }

    /// Joins the job of `launch`.
    pub fn join(launch: Launch) -> Result<Self> {
        if launch.world == 1 && launch.launcher != Launcher::Torchrun {
            return Ok(Dist::single());
        }
        let timeout = match std::env::var("TUNEBOOK_COLLECTIVE_TIMEOUT") {
            Ok(v) => Duration::from_secs_f64(
                v.trim().parse::<f64>().ok().filter(|s| *s > 0.0).ok_or_else(|| anyhow!("TUNEBOOK_COLLECTIVE_TIMEOUT={v:?} is not a positive number of seconds"))?,
            ),
            Err(_) => DEFAULT_TIMEOUT,
        };
        let backend: Box<dyn Collective> = match launch.launcher {
            Launcher::Mpich | Launcher::OpenMpi | Launcher::Slurm => mpi_backend(&launch)?,
            Launcher::Torchrun => bail!(
                "this process was started with torchrun-style variables (RANK={}, WORLD_SIZE={}): they are for NCCL on GPUs, which this build does not \
                 include. On CPUs start the ranks with MPI instead (`mpirun -n {} tunebook train ...`, or `srun` in Slurm)",
                launch.rank,
                launch.world,
                launch.world
            ),
            Launcher::Single => Box::new(Single),
        };
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            let n = launch.threads_per_rank();
            // Fails only when the pool already started; then its size stays.
            let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
        }
        let peers = Arc::new(Mutex::new(vec![]));
        let watchdog = Watchdog::start(timeout, launch.rank, peers.clone());
        let dist = Dist { launch, backend, watchdog: Some(watchdog), peers };
        let me = format!("{}\t{}", std::process::id(), host_name());
        let all = dist.guarded("exchanging process ids", |b| b.all_gather(me.as_bytes()))?;
        let table: Vec<Peer> = all
            .iter()
            .enumerate()
            .map(|(rank, b)| {
                let s = String::from_utf8_lossy(b);
                let (pid, host) = s.split_once('\t').unwrap_or(("0", "?"));
                Peer { rank, pid: pid.parse().unwrap_or(0), host: host.to_string() }
            })
            .collect();
        *dist.peers.lock().unwrap_or_else(|e| e.into_inner()) = table;
        Ok(dist)
    }

    fn guarded<T>(&self, what: &str, f: impl FnOnce(&dyn Collective) -> Result<T>) -> Result<T> {
        let _armed = self.watchdog.as_ref().map(|w| w.arm(what));
        f(self.backend.as_ref()).map_err(|e| anyhow!("rank {}: {what}: {e:#}", self.launch.rank))
    }

    /// The launch this job came from.
    pub fn launch(&self) -> &Launch {
        &self.launch
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.launch.rank
    }

    /// Number of processes.
    pub fn world(&self) -> usize {
        self.launch.world
    }

    /// Whether this is rank 0, the one that writes the run's files.
    pub fn is_leader(&self) -> bool {
        self.launch.rank == 0
    }

    /// The backend's name (`single`, `mpi`).
    pub fn backend(&self) -> &'static str {
        self.backend.name()
    }

    /// Every rank's pid and host, in rank order.
    pub fn peers(&self) -> Vec<Peer> {
        self.peers.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// Sums `buf` across ranks (`what` names it in a timeout message).
    pub fn all_reduce_f32(&self, buf: &mut [f32], what: &str) -> Result<()> {
        self.guarded(what, |b| b.all_reduce_f32(buf))
    }

    /// Sums `buf` across ranks (`what` names it in a timeout message).
    pub fn all_reduce_f64(&self, buf: &mut [f64], what: &str) -> Result<()> {
        self.guarded(what, |b| b.all_reduce_f64(buf))
    }

    /// Rank 0's `buf` on every rank.
    pub fn broadcast(&self, buf: &mut Vec<u8>, what: &str) -> Result<()> {
        self.guarded(what, |b| b.broadcast(buf))
    }

    /// Waits for every rank.
    pub fn barrier(&self, what: &str) -> Result<()> {
        self.guarded(what, |b| b.barrier())
    }
}

#[cfg(feature = "mpi")]
fn mpi_backend(launch: &Launch) -> Result<Box<dyn Collective>> {
    Ok(Box::new(mpi::Mpi::init(launch)?))
}

#[cfg(not(feature = "mpi"))]
fn mpi_backend(launch: &Launch) -> Result<Box<dyn Collective>> {
    bail!("this process was started by {} as rank {} of {}, but tunebook was built without MPI (the `mpi` feature): rebuild with it", launch.launcher, launch.rank, launch.world)
}

#[cfg(test)]
mod tests;
