use super::*;
use std::collections::HashMap;

fn detect(vars: &[(&str, &str)]) -> Result<Launch> {
    let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Launch::detect(&|k| map.get(k).cloned())
}

#[test]
fn each_launcher_is_recognised_by_the_variables_it_sets() {
    assert_eq!(detect(&[]).unwrap(), Launch::single());
    let mpich = detect(&[("PMI_RANK", "1"), ("PMI_SIZE", "2"), ("MPI_LOCALRANKID", "1"), ("MPI_LOCALNRANKS", "2")]).unwrap();
    assert_eq!((mpich.launcher.clone(), mpich.rank, mpich.world, mpich.local_rank, mpich.local_world), (Launcher::Mpich, 1, 2, 1, Some(2)));
    let ompi = detect(&[("OMPI_COMM_WORLD_RANK", "3"), ("OMPI_COMM_WORLD_SIZE", "4"), ("OMPI_COMM_WORLD_LOCAL_RANK", "1"), ("OMPI_COMM_WORLD_LOCAL_SIZE", "2")]).unwrap();
    assert_eq!((ompi.launcher.clone(), ompi.rank, ompi.world, ompi.local_rank, ompi.local_world), (Launcher::OpenMpi, 3, 4, 1, Some(2)));
    let srun = detect(&[("SLURM_PROCID", "5"), ("SLURM_STEP_NUM_TASKS", "8"), ("SLURM_LOCALID", "1"), ("SLURM_NTASKS", "8")]).unwrap();
    assert_eq!((srun.launcher.clone(), srun.rank, srun.world, srun.local_rank), (Launcher::Slurm, 5, 8, 1));
    let torch = detect(&[("RANK", "2"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "node-0"), ("MASTER_PORT", "29500")]).unwrap();
    assert_eq!((torch.launcher.clone(), torch.rank, torch.world, torch.master.as_deref()), (Launcher::Torchrun, 2, 4, Some("node-0:29500")));
}

#[test]
fn mpirun_inside_a_slurm_allocation_is_mpi_and_sbatchs_own_script_is_one_process() {
    let both = detect(&[("PMI_RANK", "0"), ("PMI_SIZE", "2"), ("SLURM_PROCID", "0"), ("SLURM_STEP_NUM_TASKS", "1")]).unwrap();
    assert_eq!(both.launcher, Launcher::Mpich);
    // The batch script: SLURM_PROCID and the allocation's SLURM_NTASKS, but no job step.
    assert_eq!(detect(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "8"), ("SLURM_JOB_ID", "42")]).unwrap(), Launch::single());
}

#[test]
fn partial_or_contradictory_launch_variables_are_errors_that_name_them() {
    let err = |vars: &[(&str, &str)]| detect(vars).unwrap_err().to_string();
    let e = err(&[("PMI_RANK", "0")]);
    assert!(e.contains("PMI_SIZE") && e.contains("incomplete"), "{e}");
    let e = err(&[("RANK", "0"), ("MASTER_ADDR", "x"), ("MASTER_PORT", "1")]);
    assert!(e.contains("WORLD_SIZE"), "{e}");
    let e = err(&[("WORLD_SIZE", "2")]);
    assert!(e.contains("RANK"), "{e}");
    let e = err(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "29500")]);
    assert!(e.contains("MASTER_ADDR"), "{e}");
    let e = err(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "http")]);
    assert!(e.contains("MASTER_PORT") && e.contains("\"http\""), "{e}");
    let e = err(&[("PMI_RANK", "2"), ("PMI_SIZE", "2")]);
    assert!(e.contains("rank 2") && e.contains("world size 2"), "{e}");
    let e = err(&[("OMPI_COMM_WORLD_RANK", "one"), ("OMPI_COMM_WORLD_SIZE", "2")]);
    assert!(e.contains("OMPI_COMM_WORLD_RANK") && e.contains("whole number"), "{e}");
    let e = err(&[("PMI_RANK", "0"), ("PMI_SIZE", "0")]);
    assert!(e.contains("0 processes"), "{e}");
}

#[test]
fn torchrun_variables_without_nccl_are_refused_with_what_to_run_instead() {
    let launch = detect(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")]).unwrap();
    let e = Dist::join(launch).err().unwrap().to_string();
    assert!(e.contains("NCCL") && e.contains("mpirun -n 2"), "{e}");
}

#[test]
fn this_process_reads_as_alive_and_a_reaped_one_as_gone() {
    assert_eq!(proc_state(std::process::id()), ProcState::Alive);
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    assert_eq!(proc_state(pid), ProcState::Gone);
}

#[test]
fn one_process_collectives_leave_the_values_as_they_are() {
    let d = Dist::single();
    let mut v = vec![1.5f32, -2.0];
    d.all_reduce_f32(&mut v, "test").unwrap();
    assert_eq!(v, vec![1.5, -2.0]);
    let mut b = b"run".to_vec();
    d.broadcast(&mut b, "test").unwrap();
    assert_eq!(b, b"run");
    assert!(d.is_leader() && d.world() == 1 && d.backend() == "single");
}

#[test]
fn a_timed_out_collective_names_the_ranks_gone_from_this_host_and_those_it_cannot_check() {
    let peers = vec![
        Peer { rank: 0, pid: 10, host: "a".into() },
        Peer { rank: 1, pid: 11, host: "a".into() },
        Peer { rank: 2, pid: 12, host: "b".into() },
    ];
    let gone_11 = |pid| if pid == 11 { ProcState::Gone } else { ProcState::Alive };
    let m = timeout_message(0, "the gradient all-reduce of step 4", Duration::from_secs(30), &peers, "a", gone_11);
    assert!(m.starts_with("rank 0: the gradient all-reduce of step 4 did not complete in 30 s"), "{m}");
    assert!(m.contains("rank 1 (pid 11 on a) exited") && m.contains("check rank 2 (pid 12 on b)") && m.contains("--run-dir"), "{m}");
    let m = timeout_message(1, "x", Duration::from_secs(5), &peers[..2], "a", |_| ProcState::Alive);
    assert!(m.contains("running, so one is stuck"), "{m}");
    let m = timeout_message(0, "x", Duration::from_secs(5), &peers[..2], "a", |_| ProcState::Stopped);
    assert!(m.contains("rank 1 (pid 11 on a) is stopped"), "{m}");
}
