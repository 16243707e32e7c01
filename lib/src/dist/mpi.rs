//! The MPI backend: the `mpi` crate over the system's MPICH or Open MPI.

use super::{Collective, Launch};
use anyhow::{Result, anyhow, bail};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::sync::Mutex;

/// `MPI_COMM_WORLD` of an initialized MPI. Calls are serialized by a lock (MPI is
/// initialized at the `Serialized` threading level), so the backend may be shared.
pub(super) struct Mpi {
    world: SimpleCommunicator,
    lock: Mutex<()>,
    // Finalizes MPI when dropped; declared last so the communicator goes first.
    _universe: Universe,
}

// SAFETY: MPI runs at the `Serialized` threading level and every call below holds
// `lock`, so no two threads call into MPI at once.
unsafe impl Send for Mpi {}
// SAFETY: as above.
unsafe impl Sync for Mpi {}

impl Mpi {
    /// Initializes MPI and checks that it agrees with the launcher's variables.
    pub(super) fn init(launch: &Launch) -> Result<Self> {
        let (universe, _level) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or_else(|| anyhow!("MPI was already initialized in this process"))?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if (rank, size) != (launch.rank, launch.world) {
            bail!(
                "{} says rank {} of {}, but MPI says rank {rank} of {size}: the MPI library tunebook is linked with is not the one \
                 that launched it (start it with the same implementation's mpirun)",
                launch.launcher,
                launch.rank,
                launch.world
            );
        }
        Ok(Mpi { world, lock: Mutex::new(()), _universe: universe })
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Collective for Mpi {
    fn name(&self) -> &'static str {
        "mpi"
    }

    fn all_reduce_f32(&self, buf: &mut [f32]) -> Result<()> {
        let _g = self.locked();
        let send = buf.to_vec();
        self.world.all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }

    fn all_reduce_f64(&self, buf: &mut [f64]) -> Result<()> {
        let _g = self.locked();
        let send = buf.to_vec();
        self.world.all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }

    fn broadcast(&self, buf: &mut Vec<u8>) -> Result<()> {
        let _g = self.locked();
        let root = self.world.process_at_rank(0);
        let mut len = buf.len() as u64;
        root.broadcast_into(&mut len);
        buf.resize(len as usize, 0);
        root.broadcast_into(&mut buf[..]);
        Ok(())
    }

    fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let _g = self.locked();
        let n = self.world.size() as usize;
        let mut lens = vec![0u64; n];
        self.world.all_gather_into(&(mine.len() as u64), &mut lens[..]);
        let width = lens.iter().copied().max().unwrap_or(0) as usize;
        if width == 0 {
            return Ok(vec![vec![]; n]);
        }
        let mut padded = mine.to_vec();
        padded.resize(width, 0);
        let mut all = vec![0u8; width * n];
        self.world.all_gather_into(&padded[..], &mut all[..]);
        Ok(all.chunks(width).zip(&lens).map(|(c, &l)| c[..l as usize].to_vec()).collect())
    }

    fn barrier(&self) -> Result<()> {
        let _g = self.locked();
        self.world.barrier();
        Ok(())
    }
}
