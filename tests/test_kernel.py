"""The tunebook kernel driven by the reference Jupyter client."""

import subprocess
import sys
import time

import jupyter_client
from jupyter_client.session import Session

from conftest import alive, collect, execute, execute_async, start_kernel, stop_kernel


def test_kernel_info_answers_while_the_library_loads():
    km = jupyter_client.KernelManager(kernel_name="tunebook")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        t0 = time.time()
        kc.wait_for_ready(timeout=60)
        info_time = time.time() - t0
        msg_id = kc.kernel_info()
        reply = kc.get_shell_msg(timeout=10)
        assert reply["parent_header"]["msg_id"] == msg_id
        content = reply["content"]
        assert content["implementation"] == "tunebook"
        assert content["language_info"]["name"].lower() == "rust"
        # The first cell reports the preload and then runs.
        first = execute(kc, "tunebook::VERSION")
        assert first.status == "ok", first.outputs
        notes = [m["content"]["data"]["text/plain"] for m in first.of_type("display_data")]
        notes += [m["content"]["data"]["text/plain"] for m in first.of_type("update_display_data")]
        assert any("tunebook" in n and "ready" in n for n in notes), notes
        assert first.result_data()["text/plain"].strip('"') == "0.1.0"
        assert info_time < 60
    finally:
        stop_kernel(km, kc)


def test_stdout_is_streamed_and_results_carry_every_mime_type(kernel):
    _, kc = kernel
    r = execute(kc, 'println!("hello from rust"); eprintln!("to stderr"); 40 + 2')
    assert r.status == "ok"
    assert "hello from rust\n" in r.stdout()
    assert "to stderr" in r.stderr()
    assert r.result_data()["text/plain"] == "42"

    r = execute(kc, 'let frame = df!("name" => ["<b>x</b>", "y"], "n" => [1i64, 2]).unwrap();\nframe.view()')
    assert r.status == "ok", r.outputs
    data = r.result_data()
    assert "<table>" in data["text/html"]
    assert "&lt;b&gt;x&lt;/b&gt;" in data["text/html"], "cell text must be escaped"
    assert "shape: (2 rows, 2 columns)" in data["text/plain"]

    r = execute(kc, 'LinePlot::new("loss").line(Line::new("train", vec![(0.0, 2.0), (1.0, 1.5)]))')
    data = r.result_data()
    assert data["application/vnd.vegalite.v5+json"]["data"]["values"][1]["y"] == 1.5
    assert data["image/svg+xml"].lstrip().startswith("<svg")
    assert "text/html" not in data


def test_compile_error_names_the_message_and_the_cell_line(kernel):
    _, kc = kernel
    r = execute(kc, 'let ok = 1;\nlet bad: i32 = "text";')
    assert r.status == "error"
    err = r.error()
    assert err["ename"] == "CompilationError"
    assert "mismatched types" in err["evalue"]
    assert any("cell line 2" in line for line in err["traceback"]), err["traceback"]
    assert r.reply["content"]["ename"] == "CompilationError"


def test_panic_reports_its_message_and_keeps_earlier_variables(kernel):
    _, kc = kernel
    assert execute(kc, "let kept = 21;").status == "ok"
    r = execute(kc, 'let doomed = 5;\npanic!("boom at step {}", 3);')
    assert r.status == "error"
    assert r.error()["ename"] == "Panic"
    assert "boom at step 3" in r.error()["evalue"]
    r = execute(kc, "kept * 2")
    assert r.status == "ok", r.outputs
    assert r.result_data()["text/plain"] == "42"


def test_live_display_is_one_display_and_ten_updates(kernel):
    _, kc = kernel
    code = """
let mut handle = display::live();
for i in 0..11 {
    handle.update(&format!("step {i}"));
}
"""
    r = execute(kc, code)
    assert r.status == "ok", r.outputs
    shown = r.of_type("display_data")
    updates = r.of_type("update_display_data")
    assert len(shown) == 1 and len(updates) == 10
    ids = {m["content"]["transient"]["display_id"] for m in shown + updates}
    assert len(ids) == 1
    assert updates[-1]["content"]["data"]["text/plain"] == "step 10"


def test_progress_bar_updates_in_place(kernel):
    _, kc = kernel
    r = execute(kc, 'let mut bar = ProgressBar::new("train", 5).every_update();\nfor i in 1..=5 { bar.set(i, format!("loss {}", 6 - i)); }')
    assert r.status == "ok", r.outputs
    assert len(r.of_type("display_data")) == 1
    last = r.of_type("update_display_data")[-1]["content"]["data"]
    assert "<progress" in last["text/html"] and "100%" in last["text/plain"]


def test_cooperative_interrupt_keeps_variables(kernel):
    km, kc = kernel
    assert execute(kc, "let before = 41;").status == "ok"
    msg_id = execute_async(kc, "interrupt::sleep(std::time::Duration::from_secs(300)).unwrap();")
    time.sleep(3)
    km.interrupt_kernel()
    r = collect(kc, msg_id, timeout=60)
    assert r.status == "error"
    assert r.error()["ename"] == "KeyboardInterrupt"
    assert "variables are kept" in r.error()["evalue"]
    r = execute(kc, "before + 1")
    assert r.result_data()["text/plain"] == "42"


def test_interrupt_of_a_cell_that_ignores_it_restarts_the_cell_process(kernel):
    km, kc = kernel
    msg_id = execute_async(kc, "std::thread::sleep(std::time::Duration::from_secs(300));")
    time.sleep(3)
    t0 = time.time()
    km.interrupt_kernel()
    r = collect(kc, msg_id, timeout=60)
    assert r.status == "error"
    assert r.error()["ename"] == "KeyboardInterrupt"
    assert "lost" in r.error()["evalue"]
    assert time.time() - t0 < 60
    r = execute(kc, "tunebook::VERSION.len() + 37")
    assert r.status == "ok", r.outputs
    assert r.result_data()["text/plain"] == "42"


def test_stdin_input_request(kernel):
    _, kc = kernel
    prompts = []

    def answer(msg):
        prompts.append(msg["content"]["prompt"])
        kc.input("Ada")

    r = execute(kc, 'let who = input("name? ");\nformat!("hello {who}")', stdin_hook=answer)
    assert r.status == "ok", r.outputs
    assert prompts == ["name? "]
    assert r.result_data()["text/plain"] == "hello Ada"  # strings render as text


def test_is_complete_and_completion(kernel):
    _, kc = kernel
    kc.is_complete("fn f() {")
    reply = kc.get_shell_msg(timeout=10)
    assert reply["content"]["status"] == "incomplete"
    kc.is_complete("let x = 1;")
    assert kc.get_shell_msg(timeout=10)["content"]["status"] == "complete"
    code = "let completion_target_value = 1;\ncompletion_target_v"
    kc.complete(code, len(code))
    reply = kc.get_shell_msg(timeout=120)
    assert reply["content"]["status"] == "ok"
    assert "completion_target_value" in reply["content"]["matches"], reply["content"]


def test_message_with_a_bad_signature_is_rejected(kernel):
    _, kc = kernel
    forged = Session(key=b"not-the-kernel-key", username="mallory")
    msg = forged.msg("execute_request", content={
        "code": "let forged = 1;", "silent": False, "store_history": True,
        "user_expressions": {}, "allow_stdin": False, "stop_on_error": True,
    })
    forged.send(kc.shell_channel.socket, msg)
    deadline = time.time() + 5
    while time.time() < deadline:
        try:
            reply = kc.get_shell_msg(timeout=0.5)
        except Exception:
            continue
        assert reply["parent_header"].get("msg_id") != msg["header"]["msg_id"], "forged request was executed"
    # The kernel is still healthy, and the forged cell never ran.
    r = execute(kc, "forged")
    assert r.status == "error" and r.error()["ename"] == "CompilationError"
    assert execute(kc, "2 + 2").result_data()["text/plain"] == "4"


def test_restart_gives_a_fresh_working_kernel(kernel):
    # The module's kernel, restarted: the last test that uses it (a kernel of its own
    # would cost one more start from nothing).
    km, kc = kernel
    assert execute(kc, "let old = 1;").status == "ok"
    km.restart_kernel(now=False)
    kc.wait_for_ready(timeout=120)
    r = execute(kc, "old")
    assert r.status == "error", "variables do not survive a restart"
    r = execute(kc, "let fresh = 20; fresh + 22")
    assert r.status == "ok" and r.result_data()["text/plain"] == "42"


def test_a_kernel_whose_jupyter_dies_exits():
    # The client process starts a kernel and is then killed without shutting it down.
    script = (
        "import jupyter_client, time\n"
        "km = jupyter_client.KernelManager(kernel_name='tunebook')\n"
        "km.start_kernel()\n"
        "print(km.provisioner.process.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    client = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    kernel_pid = int(client.stdout.readline())
    time.sleep(3)
    assert alive(kernel_pid)
    client.kill()
    client.wait()
    deadline = time.time() + 20
    while alive(kernel_pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not alive(kernel_pid), "an orphaned kernel must exit, not hold its slot and memory"
