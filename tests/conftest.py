"""Shared fixtures for the end-to-end tests.

The tests talk to the real `tunebook-kernel` through the kernelspec that
`scripts/setup.sh` installed, using the reference Jupyter client
(`jupyter_client`) and `nbconvert`.
"""

import os
import queue
import time

import jupyter_client
import pytest

KERNEL_NAME = "tunebook"
# Kernels in these tests start from scratch and start no standby kernels (which
# would preload in the background and compete for the CPU with the tests);
# tests/test_standby.py turns them on for its own kernels.
os.environ["TUNEBOOK_KERNEL_STANDBY"] = "0"
# The first start after a fresh install may compile; later starts take seconds.
READY_TIMEOUT = 900


def alive(pid):
    """Whether a process runs (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def start_kernel():
    km = jupyter_client.KernelManager(kernel_name=KERNEL_NAME)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=120)
    return km, kc


def stop_kernel(km, kc):
    kc.stop_channels()
    km.shutdown_kernel(now=False)


class Result:
    def __init__(self, reply, outputs):
        self.reply = reply
        self.outputs = outputs

    @property
    def status(self):
        return self.reply["content"]["status"]

    def of_type(self, msg_type):
        return [m for m in self.outputs if m["header"]["msg_type"] == msg_type]

    def stdout(self):
        return "".join(m["content"]["text"] for m in self.of_type("stream") if m["content"]["name"] == "stdout")

    def stderr(self):
        return "".join(m["content"]["text"] for m in self.of_type("stream") if m["content"]["name"] == "stderr")

    def result_data(self):
        res = self.of_type("execute_result")
        return res[0]["content"]["data"] if res else {}

    def error(self):
        errs = self.of_type("error")
        return errs[0]["content"] if errs else None


def execute(kc, code, timeout=READY_TIMEOUT, stdin_hook=None):
    outputs = []
    kwargs = {}
    if stdin_hook is not None:
        kwargs = {"allow_stdin": True, "stdin_hook": stdin_hook}
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=outputs.append, **kwargs)
    return Result(reply, outputs)


def execute_async(kc, code):
    """Send an execute_request without waiting; returns its msg_id."""
    return kc.execute(code)


def collect(kc, msg_id, timeout):
    """Collect iopub messages and the shell reply for msg_id."""
    outputs = []
    deadline = time.time() + timeout
    idle = False
    while not idle and time.time() < deadline:
        try:
            msg = kc.get_iopub_msg(timeout=1)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["header"]["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            idle = True
        else:
            outputs.append(msg)
    while time.time() < deadline:
        try:
            reply = kc.get_shell_msg(timeout=1)
        except queue.Empty:
            continue
        if reply["parent_header"].get("msg_id") == msg_id:
            return Result(reply, outputs)
    raise TimeoutError(f"no reply to {msg_id} within {timeout} s")


@pytest.fixture(scope="module")
def kernel():
    km, kc = start_kernel()
    # The first cell waits for the preload; do it once here.
    first = execute(kc, "1 + 1")
    assert first.status == "ok", first.outputs
    yield km, kc
    stop_kernel(km, kc)
