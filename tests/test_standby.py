"""Standby kernels: a kernel start that finds a preloaded kernel waiting takes it
over, in the notebook's own directory and environment (kernel/src/standby.rs)."""

import os
import signal
import subprocess
import time

import jupyter_client
import pytest

from conftest import KERNEL_NAME, READY_TIMEOUT, alive, collect, execute, execute_async


def kernel_root():
    return os.path.join(os.environ.get("TUNEBOOK_CACHE", os.path.expanduser("~/.cache/tunebook")), "kernel")


def read_pid(name):
    try:
        pid = int(open(os.path.join(kernel_root(), name)).read().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


@pytest.fixture
def standby():
    spec = jupyter_client.kernelspec.KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    exe = spec.argv[0]
    env = {**os.environ, **spec.env, "TUNEBOOK_KERNEL_STANDBY": "1"}
    subprocess.run([exe, "standby", "--stop"], env=env, check=False)
    time.sleep(1)
    # What a kernel does by itself once idle or at shutdown.
    proc = subprocess.Popen([exe, "standby"], env=env, start_new_session=True)
    deadline = time.time() + READY_TIMEOUT
    while read_pid("standby.ready") != proc.pid:
        assert proc.poll() is None, "the standby kernel exited while preloading"
        assert time.time() < deadline, "the standby kernel did not finish preloading"
        time.sleep(0.5)
    yield proc.pid, env
    subprocess.run([exe, "standby", "--stop"], env=env, check=False)
    try:
        proc.kill()
    except OSError:
        pass
    proc.wait(timeout=30)


def test_a_kernel_start_takes_over_the_waiting_standby(standby, tmp_path):
    standby_pid, env = standby
    env = {**env, "TB_STANDBY_PROBE": "set by the notebook server"}
    km = jupyter_client.KernelManager(kernel_name=KERNEL_NAME)
    t0 = time.time()
    km.start_kernel(env=env, cwd=str(tmp_path))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        first = execute(kc, 'std::env::current_dir().unwrap().display().to_string()')
        first_result = time.time() - t0
        assert first.status == "ok", first.outputs
        launcher = km.provisioner.process.pid
        assert read_pid(f"claimed-{launcher}") == standby_pid, "the launcher handed the start to the standby"
        notes = [m["content"]["data"]["text/plain"] for m in first.of_type("display_data")]
        notes += [m["content"]["data"]["text/plain"] for m in first.of_type("update_display_data")]
        assert any("standby" in n for n in notes), notes
        # Cells run in the notebook's directory with the notebook server's environment.
        assert first.result_data()["text/plain"].strip('"') == str(tmp_path)
        r = execute(kc, 'std::env::var("TB_STANDBY_PROBE").unwrap()')
        assert r.result_data()["text/plain"].strip('"') == "set by the notebook server", r.outputs
        # A cell process restarted after an interrupt keeps both.
        msg_id = execute_async(kc, "std::thread::sleep(std::time::Duration::from_secs(300));")
        time.sleep(2)
        km.interrupt_kernel()
        r = collect(kc, msg_id, timeout=60)
        assert r.error()["ename"] == "KeyboardInterrupt", r.outputs
        r = execute(kc, 'format!("{}|{}", std::env::current_dir().unwrap().display(), std::env::var("TB_STANDBY_PROBE").unwrap())')
        assert r.result_data()["text/plain"].strip('"') == f"{tmp_path}|set by the notebook server", r.outputs
        # The kernel goes when Jupyter kills its launcher.
        os.kill(launcher, signal.SIGKILL)
        deadline = time.time() + 15
        while alive(standby_pid) and time.time() < deadline:
            time.sleep(0.2)
        assert not alive(standby_pid), "the claimed kernel outlived its launcher"
        print(f"start -> first result through a standby: {first_result:.2f} s")
    finally:
        kc.stop_channels()
        km.cleanup_resources()
