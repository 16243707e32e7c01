"""End-to-end tests of `tunebook serve`: the real server on a real port, driven by the
official `openai` Python client (and raw HTTP where a client would refuse to send
the bad input), on the SmolLM2-135M-Instruct GGUF.

One server is shared by the module (API key, a random rank-16 adapter, an inference
table); the SIGKILL test starts its own.
"""

import json
import os
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from deltalake import DeltaTable
from peft_adapter import write_adapter

GGUF = os.environ.get("TUNEBOOK_SMOLLM2_GGUF", "")
KEY = "sk-test-key"
QUESTION = "What is the capital of France? Answer in one sentence."

pytestmark = pytest.mark.skipif(not os.path.isfile(GGUF), reason="the SmolLM2 GGUF is installed by scripts/setup.sh")


class Counter:
    """A thread-safe count."""

    def __init__(self):
        self.n, self.lock = 0, threading.Lock()

    def add(self):
        with self.lock:
            self.n += 1


class Server:
    """`tunebook serve` as a subprocess; `url` is its base URL once it said it is ready."""

    def __init__(self, args, timeout=120):
        self.proc = subprocess.Popen(["tunebook", "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines = []
        deadline = time.time() + timeout
        self.url = None
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if "ready at " in line:
                self.url = line.split("ready at ", 1)[1].strip()
                break
        if self.url is None:
            self.proc.kill()
            raise RuntimeError(f"tunebook serve did not start: {''.join(self.lines)}\n{self.proc.stderr.read()}")
        self.root = self.url.removesuffix("/v1")

    def stop(self, sig=signal.SIGTERM, timeout=30):
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    write_adapter(str(d / "wild"), GGUF, rank=16, seed=1)
    (d / "keys").write_text(f"# test keys\n{KEY}\n")
    s = Server([GGUF, "--served-model-name", "smol", "--adapter", f"wild={d / 'wild'}", "--api-key-file", str(d / "keys"),
                "--inference-table", str(d / "table"), "--max-concurrency", "8"])
    s.table = str(d / "table")
    s.counted = Counter()  # requests that reached the completion routes, for the inference table
    yield s
    if s.proc.poll() is None:
        s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


def chat(client, server, model="smol", question=QUESTION, **kw):
    server.counted.add()
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 40)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], **kw)


def test_greedy_chat_equals_tunebook_generate(server, client):
    r = chat(client, server)
    out = subprocess.run(["tunebook", "generate", "--model", GGUF, "--chat", QUESTION, "--max-tokens", "40"],
                         capture_output=True, text=True, check=True)
    assert r.choices[0].message.content == out.stdout.removesuffix("\n")
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.model == "smol"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_chunks_concatenate_to_the_non_streamed_text_and_usage_totals_match(server, client):
    whole = chat(client, server, max_tokens=24)
    server.counted.add()
    stream = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": QUESTION}], temperature=0,
                                            max_tokens=24, stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        assert len(chunk.choices) == 1
        if chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None, "include_usage sends a final usage chunk"
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens, whole.usage.completion_tokens)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # max_tokens counts what is generated: a 24-token limit that is hit reports `length`.
    if whole.choices[0].finish_reason == "length":
        assert whole.usage.completion_tokens == 24


def test_a_stop_string_spanning_two_tokens_never_appears(server, client):
    r = chat(client, server, max_tokens=30, logprobs=True, top_logprobs=2)
    text = r.choices[0].message.content
    tokens = [t.token for t in r.choices[0].logprobs.content]
    assert "".join(tokens).startswith(text[:10])
    assert all(len(t.top_logprobs) == 2 for t in r.choices[0].logprobs.content)
    # The last two characters of one token and the first two of the next.
    i = next(i for i in range(3, len(tokens) - 1) if len(tokens[i].strip()) >= 2 and len(tokens[i + 1].strip()) >= 2)
    stop = tokens[i][-2:] + tokens[i + 1][:2]
    cut = text.index(stop)
    want = text[:cut]
    r2 = chat(client, server, max_tokens=30, stop=[stop, "never-produced"])
    assert r2.choices[0].message.content == want
    assert r2.choices[0].finish_reason == "stop"
    server.counted.add()
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=30, stop=stop, stream=True) if c.choices)
    assert streamed == want
    assert stop not in streamed


def test_adapters_chosen_per_request_answer_like_themselves_inside_a_mixed_batch(server, client):
    models = client.models.list().data
    ids = {m.id: m for m in models}
    assert set(ids) == {"smol", "wild"}
    assert ids["wild"].model_extra.get("parent") == "smol"
    base_alone = chat(client, server, max_tokens=16).choices[0].message.content
    wild_alone = chat(client, server, model="wild", max_tokens=16).choices[0].message.content
    assert wild_alone != base_alone, "the adapter changes the answer"
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(chat, client, server, model=m, max_tokens=16) for m in ["smol", "wild"] * 3]
        answers = [f.result().choices[0].message.content for f in futures]
    assert answers == [base_alone, wild_alone] * 3
    metrics = httpx.get(f"{server.root}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    steps = float(next(l.split()[-1] for l in metrics.splitlines() if l.startswith("tunebook:engine_steps_total")))
    seqs = float(next(l.split()[-1] for l in metrics.splitlines() if l.startswith("tunebook:engine_step_sequences_total")))
    assert seqs > steps, "some steps advanced several sequences together"


def test_bad_requests_get_openais_status_and_envelope(server, client):
    h = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    url = f"{server.url}/chat/completions"
    server.counted.add()
    r = httpx.post(url, headers=h, content=b'{"model": "smol", "messages": [')
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert "JSON" in r.json()["error"]["message"]
    server.counted.add()
    r = httpx.post(url, headers=h, json={"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, server, temperature="hot")
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as e:
        chat(client, server, model="no-such-model")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, server, question="word " * 9000, max_tokens=10)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, server, max_tokens=100_000)
    assert e.value.body["code"] == "context_length_exceeded"
    wrong = openai.OpenAI(base_url=server.url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="smol", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    r = httpx.get(f"{server.url}/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.root}/health").status_code == 200, "/health needs no key"
    r = httpx.get(url, headers=h)
    assert r.status_code == 405 and "not allowed" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:
        server.counted.add()
        client.completions.create(model="smol", prompt="word " * 9000, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded" and "in the prompt" in e.value.body["message"]
    r = httpx.post(url, headers={**h, "x-request-id": "trace-42"}, json={"model": "smol"})
    server.counted.add()
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert r.headers["x-request-id"] == "trace-42"


def test_32_concurrent_clients_finish_or_fail_alone(server, client):
    def normal(i):
        return chat(client, server, question=f"Count from {i} to {i + 5}.", max_tokens=10).choices[0].finish_reason

    def streaming(i):
        server.counted.add()
        s = client.chat.completions.create(model="smol" if i % 2 else "wild", messages=[{"role": "user", "content": f"Name {i} fruits."}],
                                           max_tokens=10, temperature=0.7, seed=i, stream=True)
        return [c.choices[0].finish_reason for c in s if c.choices][-1]

    def disconnecting(i):
        server.counted.add()
        with httpx.stream("POST", f"{server.url}/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "smol", "messages": [{"role": "user", "content": "Tell me a long story."}],
                                "max_tokens": 200, "stream": True}, timeout=120) as r:
            for line in r.iter_lines():
                if '"content"' in line and '"content":""' not in line:
                    return "left"
        return "never streamed"

    def garbage(i):
        server.counted.add()
        r = httpx.post(f"{server.url}/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, content=os.urandom(64))
        return r.status_code

    jobs = [(normal, i) for i in range(12)] + [(streaming, i) for i in range(12)] + [(disconnecting, i) for i in range(6)] + [(garbage, i) for i in range(2)]
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda j: j[0](j[1]), jobs))
    assert all(r in ("stop", "length") for r in results[:24]), results
    assert results[24:30] == ["left"] * 6
    assert results[30:] == [400, 400]
    # Disconnected sequences were freed, and the server still answers.
    time.sleep(0.5)
    metrics = httpx.get(f"{server.root}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    aborted = float(next(l.split()[-1] for l in metrics.splitlines() if l.startswith("tunebook:requests_aborted_total")))
    assert aborted >= 6
    assert 'vllm:num_requests_running{model_name="smol"} 0' in metrics
    assert "Paris" in chat(client, server).choices[0].message.content


def test_metrics_are_prometheus_text_with_vllm_names(server, client):
    chat(client, server, max_tokens=4)
    text = httpx.get(f"{server.root}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:inter_token_latency_seconds_count", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                 "vllm:request_success_total"]:
        assert name in text, name
    assert 'http_requests_total{handler="/v1/chat/completions",method="POST",status="200"}' in text
    assert 'status="401"' in text


def test_the_inference_table_has_one_row_per_request_after_a_graceful_stop(server, client):
    # Runs last in this module: it stops the shared server.
    chat(client, server, model="wild", max_tokens=5)
    n = server.counted.n
    assert server.stop() == 0, "SIGTERM ends the server with status 0"
    t = DeltaTable(server.table).to_pyarrow_table().to_pylist()
    assert len(t) == n, (len(t), n)
    ok = [r for r in t if r["status_code"] == 200]
    assert {r["served_adapter"] for r in ok} == {None, "wild"}
    assert any(r["status_code"] == 401 for r in t) is False, "requests refused for their key never reach the table"
    assert sorted({r["status_code"] for r in t if r["status_code"] != 200}) == [400, 404, 499], "refused, unknown model, client gone"
    row = next(r for r in ok if r["served_adapter"] == "wild")
    assert json.loads(row["request"])["model"] == "wild"
    assert json.loads(row["response"])["usage"]["completion_tokens"] == row["completion_tokens"]
    assert any(r["client_request_id"] == "trace-42" for r in t)


def test_a_server_killed_mid_load_leaves_a_readable_inference_table(tmp_path):
    s = Server([GGUF, "--inference-table", str(tmp_path / "table"), "--served-model-name", "smol"])
    c = openai.OpenAI(base_url=s.url, api_key="unused", max_retries=0, timeout=60)
    ask = lambda i: c.chat.completions.create(model="smol", messages=[{"role": "user", "content": f"Say {i}."}], max_tokens=6)
    done = [ask(i) for i in range(4)]
    time.sleep(1.5)  # one flush interval: these four are committed
    stop = threading.Event()

    def load():
        i = 100
        while not stop.is_set():
            try:
                ask(i)
            except Exception:
                return
            i += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.2)
    s.proc.kill()
    s.proc.wait()
    stop.set()
    for t in threads:
        t.join()
    rows = DeltaTable(str(tmp_path / "table")).to_pyarrow_table().to_pylist()
    assert len(rows) >= len(done)
    for r in rows:
        assert r["status_code"] == 200
        assert json.loads(r["response"])["choices"][0]["message"]["content"] is not None


def test_adapters_load_and_unload_at_run_time_and_a_full_queue_gets_429(tmp_path):
    write_adapter(str(tmp_path / "late"), GGUF, rank=8, seed=5)
    # An adapter for another model: q_proj of the wrong width.
    bad = tmp_path / "bad"
    write_adapter(str(bad), GGUF, rank=8, seed=6)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "r": 4}))
    s = Server([GGUF, "--served-model-name", "smol", "--allow-adapter-updates", "--max-concurrency", "1", "--max-queue", "1"])
    try:
        c = openai.OpenAI(base_url=s.url, api_key="unused", max_retries=0, timeout=60)
        ask = lambda model: c.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=12, temperature=0)
        with pytest.raises(openai.NotFoundError):
            ask("late")
        r = httpx.post(f"{s.url}/load_lora_adapter", json={"lora_name": "late", "lora_path": str(tmp_path / "late")})
        assert r.status_code == 200 and "late" in r.text, r.text
        assert {m.id for m in c.models.list().data} == {"smol", "late"}
        assert ask("late").choices[0].message.content != ask("smol").choices[0].message.content
        r = httpx.post(f"{s.url}/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(bad)})
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path", r.text
        assert "lora_A" in r.json()["error"]["message"] and "expected" in r.json()["error"]["message"], r.text
        r = httpx.post(f"{s.url}/load_lora_adapter", json={"lora_name": "late", "lora_path": str(tmp_path / "late")})
        assert r.status_code == 400, "a name is served once"
        assert httpx.post(f"{s.url}/unload_lora_adapter", json={"lora_name": "late"}).status_code == 200
        # Unloading a name that is not served is a 404, and the server goes on.
        r = httpx.post(f"{s.url}/unload_lora_adapter", json={"lora_name": "typo"}, timeout=10)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert {m.id for m in c.models.list().data} == {"smol"}
        with pytest.raises(openai.NotFoundError):
            ask("late")
        # One running, one queued: the rest are told to come back later.
        def slow(i):
            try:
                c.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=40,
                                          extra_body={"ignore_eos": True})
                return "ok"
            except openai.RateLimitError as e:
                assert e.response.headers["retry-after"] == "1"
                return "429"
        with ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(slow, range(6)))
        assert outcomes.count("ok") >= 2 and outcomes.count("429") >= 1, outcomes
        assert "Paris" in ask("smol").choices[0].message.content, "the server goes on after refusing"
    finally:
        s.stop()

    # Without --allow-adapter-updates the routes are refused.
    s = Server([GGUF, "--served-model-name", "smol"])
    try:
        r = httpx.post(f"{s.url}/load_lora_adapter", json={"lora_name": "late", "lora_path": str(tmp_path / "late")})
        assert r.status_code == 403 and "--allow-adapter-updates" in r.json()["error"]["message"]
    finally:
        assert s.stop() == 0
