"""The HTTP server in real processes on 127.0.0.1: answers equal `generate` token for token (alone
and batched), 32 concurrent requests, every bad input, OpenAI client and streaming, TP=2 under
torchrun, clean shutdown, and the web page in headless Chromium."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_gpt2
from slow_server import StepEngine, WordTokenizer

# real multi-process runs (torchrun, servers): the slow tier (`-m "not slow"` skips it)
pytestmark = pytest.mark.slow

httpx = pytest.importorskip("httpx")

QUESTIONS = [
    "What is (are) Glaucoma ?",
    "What are the symptoms of Diabetes ?",
    "How to prevent Heart Attack ?",
    "Is Marfan syndrome inherited ?",
    "What are the treatments for Asthma ?",
    "Who is at risk for Skin Cancer ?",
]
NEW_TOKENS = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args: list[str], launcher: list[str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.log = log
        self.proc = subprocess.Popen(
            launcher + ["-m", "megatron_yuyuan.serve", *args, "--port", str(self.port)],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited early:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"server did not start:\n{log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)  # every process of the job, as a terminal's Ctrl-C
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            log = self.log.read_text()[-3000:]
            raise AssertionError(f"server ignored SIGTERM:\n{log}") from None


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    write_gpt2(root / "hf", positions=128, peaked=True)
    from checkpoints_convert.to_megatron import main as to_megatron

    assert to_megatron(["--hf-dir", str(root / "hf"), "--save", str(root / "mc")]) == 0
    return root


def expected(models: Path, source: list[str], name: str) -> list[dict]:
    """`python -m megatron_yuyuan.generate` answers, one question at a time (batch size 1)."""
    inp, out = models / "questions.jsonl", models / f"expected_{name}.jsonl"
    inp.write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS))
    cmd = [sys.executable, "-m", "megatron_yuyuan.generate", *source, "--input", str(inp)]
    cmd += ["--output", str(out), "--batch-size", "1", "--max-new-tokens", str(NEW_TOKENS)]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return [json.loads(line) for line in out.read_text().splitlines()]


async def ask_all(url: str, questions: list[str]) -> list[dict]:
    async with httpx.AsyncClient(timeout=120) as client:
        replies = await asyncio.gather(
            *(
                client.post(url + "/api/answer", json={"question": q, "max_new_tokens": NEW_TOKENS})
                for q in questions
            )
        )
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    return [r.json() for r in replies]


def check_answers(url: str, want: list[dict]) -> None:
    alone = [
        httpx.post(url + "/api/answer", json={"question": q, "max_new_tokens": NEW_TOKENS}).json()
        for q in QUESTIONS
    ]
    for got, w in zip(alone, want):
        assert (got["answer"], got["tokens"]) == (w["prediction"], w["new_tokens"])
        assert got["finish_reason"] == w["finish_reason"]
    many = [QUESTIONS[i % len(QUESTIONS)] for i in range(32)]  # batched with each other
    for i, got in enumerate(asyncio.run(ask_all(url, many))):
        w = want[i % len(QUESTIONS)]
        assert (got["answer"], got["tokens"]) == (w["prediction"], w["new_tokens"]), i


BAD = [
    (b'{"question": ', 400, None),
    (b"\xff\xfe", 400, None),
    (b"[1, 2]", 422, "body"),
    (b"{}", 422, "question"),
    (b'{"question": ""}', 422, "question"),
    (b'{"question": "   "}', 422, "question"),
    (b'{"question": 5}', 422, "question"),
    (b'{"question": "x", "max_new_tokens": "5"}', 422, "max_new_tokens"),
    (b'{"question": "x", "max_new_tokens": 0}', 422, "max_new_tokens"),
    (b'{"question": "x", "temperature": -1}', 422, "temperature"),
    (b'{"question": "x", "top_p": 0}', 422, "top_p"),
    (b'{"question": "x", "top_k": -3}', 422, "top_k"),
    (b'{"question": "x", "colour": "red"}', 422, "colour"),
    (b'{"question": "x", "max_new_tokens": 100000}', 422, "max_new_tokens"),
    (b'{"question": "x", "seed": 18446744073709551616}', 422, "seed"),
    (b'{"question": "x", "stream": "yes"}', 422, "stream"),
    (b"[" * 100000, 400, None),
]


@pytest.fixture(scope="module")
def hf_server(models, tmp_path_factory):
    """One server over the HF directory for the tests below; the last one stops it."""
    want = expected(models, ["--hf-dir", str(models / "hf")], "hf")
    log = tmp_path_factory.mktemp("hf_server") / "hf.log"
    server = Server(["--hf-dir", str(models / "hf"), "--batch-size", "8"], [sys.executable], log)
    yield server, want
    server.stop()


def test_hf_server_answers_errors_and_openai(hf_server, models):
    server, want = hf_server
    url = server.url
    check_answers(url, want)
    for body, status, param in BAD:  # curl-style: no JSON content type
        r = httpx.post(url + "/api/answer", content=body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["param"] == param, (body, r.text)
    assert (
        "128 (the model's positions)"
        in httpx.post(url + "/api/answer", json={"question": "x", "max_new_tokens": 500}).json()[
            "error"
        ]["message"]
    )
    # a bad request next to good ones harms none of them
    assert [a["answer"] for a in asyncio.run(ask_all(url, QUESTIONS[:3]))] == [
        w["prediction"] for w in want[:3]
    ]
    # streaming QA endpoint: the deltas add up to the answer
    with httpx.stream(
        "POST",
        url + "/api/answer",
        json={"question": QUESTIONS[0], "max_new_tokens": NEW_TOKENS, "stream": True},
    ) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1]["done"] and events[-1]["answer"] == want[0]["prediction"]
    assert "".join(e.get("text", "") for e in events[:-1]).strip() == want[0]["prediction"]
    # OpenAI completions: raw prompt, greedy at temperature 0, stop strings, streaming
    prompt = f"Question:{QUESTIONS[1]} answer:"
    r = httpx.post(
        url + "/v1/completions",
        json={"model": "hf", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0},
    )
    choice = r.json()["choices"][0]
    assert choice["text"].strip() == want[1]["prediction"]
    assert r.json()["usage"]["completion_tokens"] == want[1]["new_tokens"]
    words = want[1]["prediction"].split()
    if len(words) > 2:
        stop = " " + words[2]
        r = httpx.post(
            url + "/v1/completions",
            json={"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "stop": stop},
        ).json()["choices"][0]
        assert r["finish_reason"] == "stop" and stop not in r["text"]
        assert want[1]["prediction"].startswith(r["text"].strip())
    assert (
        httpx.post(url + "/v1/completions", json={"model": "gpt-4", "prompt": "x"}).status_code
        == 404
    )
    for bad, param in (
        ({"prompt": "x", "n": 65}, "n"),
        ({"prompt": ["x"] * 16, "n": 5}, "n"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": ["a", 5]}, "prompt"),
        ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "logprobs": 2, "echo": True}, "logprobs"),
    ):
        r = httpx.post(url + "/v1/completions", json=bad)
        assert r.status_code == 422 and r.json()["error"]["param"] == param, (bad, r.text)
    # what OpenAI-style clients send at neutral values is accepted
    neutral = {
        "prompt": prompt,
        "max_tokens": None,
        "temperature": 0,
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "logprobs": None,
        "best_of": 1,
        "logit_bias": {},
    }
    r = httpx.post(url + "/v1/completions", json=neutral)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 16, r.text
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["steps"] > 0
    try:
        import openai
    except ImportError:
        openai = None
    if openai is not None:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        out = client.completions.create(
            model="hf", prompt=prompt, max_tokens=NEW_TOKENS, temperature=0
        )
        assert out.choices[0].text.strip() == want[1]["prediction"]
        pieces = client.completions.create(
            model="hf", prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, stream=True
        )
        assert "".join(p.choices[0].text for p in pieces).strip() == want[1]["prediction"]
        assert [m.id for m in client.models.list()] == ["hf"]
    page = httpx.get(url + "/").text
    assert "Not medical advice" in page and str(models / "hf") in page
    assert "http://" not in page.replace(url, "") and "https://" not in page  # offline page


def test_web_page_in_headless_chromium(hf_server, tmp_path):
    server, want = hf_server
    browser_check(server.url, want[0]["prediction"], tmp_path)


def test_hf_server_stops_cleanly_on_sigterm(hf_server):
    server, _ = hf_server
    assert server.stop() == 0
    assert "server stopped" in server.log.read_text()


def browser_check(url: str, answer: str, tmp_path: Path) -> None:
    """Headless Chromium types a question, submits, waits for the streamed answer."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser check: the playwright package is not installed")
    if chromium is None:
        pytest.skip("browser check: no chromium binary (apt-get install chromium)")
    shot = Path(os.environ.get("MEGATRON_YUYUAN_SCREENSHOT", tmp_path / "serve_page.png"))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 900, "height": 700})
        page.goto(url + "/")
        page.fill("#question", QUESTIONS[0])
        page.fill("#max_new_tokens", str(NEW_TOKENS))
        page.click("#submit")
        page.wait_for_selector("#answer[data-done='1']", timeout=60_000)
        text = page.inner_text("#answer")
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert text.strip() == answer
    assert shot.read_bytes()[:4] == b"\x89PNG"


def test_megatron_servers_tp1_and_tp2_answer_as_generate(models, tmp_path):
    want = expected(models, ["--load", str(models / "mc")], "mc")
    server = Server(["--load", str(models / "mc")], [sys.executable], tmp_path / "tp1.log")
    try:
        check_answers(server.url, want)
    finally:
        assert server.stop() == 0
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
    ]
    server = Server(
        ["--load", str(models / "mc"), "--tensor-model-parallel-size", "2"],
        launcher,
        tmp_path / "tp2.log",
    )
    try:
        check_answers(server.url, want)
        # a client that leaves mid-stream: the server goes on serving the others
        with httpx.stream(
            "POST",
            server.url + "/api/answer",
            json={"question": QUESTIONS[0], "max_new_tokens": 100, "stream": True},
        ) as r:
            next(r.iter_lines())
        assert (
            httpx.post(
                server.url + "/api/answer",
                json={"question": QUESTIONS[2], "max_new_tokens": NEW_TOKENS},
            ).json()["answer"]
            == want[2]["prediction"]
        )
    finally:
        server.stop(signal.SIGINT)  # Ctrl-C: torchrun itself exits non-zero on a signal
    log = (tmp_path / "tp2.log").read_text()
    assert "server stopped" in log, log[-3000:]  # rank 0 shut down and released the follower


def test_cli_refuses_bad_setups(models, tmp_path, capsys):
    from megatron_yuyuan.cli.serve import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        assert main(["--hf-dir", str(models / "hf"), "--port", str(taken)]) == 2
    assert "choose another --port" in capsys.readouterr().err
    assert main(["--hf-dir", str(tmp_path), "--port", str(free_port())]) == 2
    assert "no config.json" in capsys.readouterr().err
    for bad in (["--port", "70000"], ["--scheduler", "fifo"], ["--log-level", "loud"]):
        with pytest.raises(SystemExit) as exc:
            main(["--hf-dir", str(models / "hf"), *bad])
        assert exc.value.code == 2 and capsys.readouterr().err.startswith("error:")


def test_full_queue_answers_503_with_retry_after():
    from fastapi.testclient import TestClient

    from megatron_yuyuan.serve.app import ServedModel, create_app
    from megatron_yuyuan.serve.scheduler import Scheduler

    scheduler = Scheduler(StepEngine(0.02), max_batch_size=1, max_queue=1)
    app = create_app(scheduler, WordTokenizer(), ServedModel("fake", "nowhere"))
    ask = {"question": "a b", "max_new_tokens": 10}
    with TestClient(app) as client:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda _: client.post("/api/answer", json=ask), range(8)))
    codes = sorted(r.status_code for r in replies)
    assert codes.count(200) >= 2 and 503 in codes, codes
    busy = next(r for r in replies if r.status_code == 503)
    assert busy.headers["Retry-After"] == "1" and "busy" in busy.json()["error"]["message"]
    assert all(r.json()["answer"] == "x " * 9 + "x" for r in replies if r.status_code == 200)


def test_prompt_limits_name_the_prompt_and_streams_start_stripped():
    """A prompt that alone fills the positions names the prompt (and its list index); the
    streamed answer starts like the stripped answer."""
    from fastapi.testclient import TestClient

    from megatron_yuyuan.serve.app import ServedModel, create_app
    from megatron_yuyuan.serve.scheduler import Scheduler

    engine = StepEngine(0.001, max_positions=16)
    app = create_app(Scheduler(engine), WordTokenizer(), ServedModel("fake", "x"))
    with TestClient(app) as client:
        r = client.post("/api/answer", json={"question": "w " * 20, "max_new_tokens": 2})
        assert r.status_code == 422 and r.json()["error"]["param"] == "question"
        assert "at most 16 positions" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"prompt": ["hi", "w " * 20], "max_tokens": 2})
        assert r.status_code == 422 and "prompt[1]" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"prompt": "hi", "stop": [""]})
        assert r.status_code == 422 and "non-empty" in r.json()["error"]["message"]
        with client.stream(
            "POST", "/api/answer", json={"question": "a b", "max_new_tokens": 3, "stream": True}
        ) as r:
            events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: ")]
        assert events[0]["text"] == "x" and events[-1]["answer"] == "x x x"
        r = client.post(
            "/v1/completions",
            json={
                "prompt": "hi",
                "max_tokens": 3,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        chunks = [x[6:] for x in r.text.splitlines() if x.startswith("data: ")]
        assert chunks[-1] == "[DONE]" and json.loads(chunks[-2])["usage"]["completion_tokens"] == 3


def test_bodies_beyond_the_limit_and_foreign_origins_are_refused_and_the_server_still_answers():
    from fastapi.testclient import TestClient

    from megatron_yuyuan.serve.app import ServedModel, create_app
    from megatron_yuyuan.serve.scheduler import Scheduler
    from megatron_yuyuan.serve.schemas import MAX_BODY_BYTES

    app = create_app(
        Scheduler(StepEngine(0.001)),
        WordTokenizer(),
        ServedModel("fake", "x"),
        allowed_origins=["https://app.example.org"],
    )
    ok = {"question": "a b", "max_new_tokens": 2}
    with TestClient(app) as client:
        r = client.post("/api/answer", content=b"{}", headers={"content-length": str(1 << 30)})
        assert r.status_code == 413
        r = client.post("/api/answer", content=b"x" * (MAX_BODY_BYTES + 1))
        assert r.status_code == 413
        evil = client.post("/api/answer", json=ok, headers={"origin": "https://evil.example"})
        assert evil.status_code == 403 and "--allowed-origins" in evil.text
        own = client.post("/api/answer", json=ok, headers={"origin": "http://testserver"})
        assert own.status_code == 200
        listed = client.post("/api/answer", json=ok, headers={"origin": "https://app.example.org"})
        assert listed.status_code == 200
        assert client.post("/api/answer", json=ok).status_code == 200


def test_a_chunked_body_is_read_no_further_than_the_limit():
    import asyncio

    from starlette.requests import Request as StarletteRequest

    from megatron_yuyuan.serve.errors import APIError
    from megatron_yuyuan.serve.schemas import MAX_BODY_BYTES, read_limited

    served = []

    async def receive():  # a client streaming 1 MiB chunks without a Content-Length
        served.append(1)
        return {"type": "http.request", "body": b"x" * (1 << 20), "more_body": len(served) < 1024}

    scope = {"type": "http", "method": "POST", "headers": [], "path": "/api/answer"}
    with pytest.raises(APIError) as err:
        asyncio.run(read_limited(StarletteRequest(scope, receive)))
    assert err.value.status == 413 and len(served) <= MAX_BODY_BYTES // (1 << 20) + 1


# --- a server that strangers can reach: shutdown, idle and slow connections ----------------------
class SlowServer(Server):
    """``tests/slow_server.py``: the real HTTP layer over an engine taking 50 ms per token."""

    def __init__(self, log: Path, head_timeout_s: float = 2.0, grace_s: float = 30.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        script = Path(__file__).with_name("slow_server.py")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(self.port), str(head_timeout_s), str(grace_s)],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError(f"server did not start:\n{log.read_text()[-3000:]}")

    def answered_within(self, seconds: float = 5.0) -> bool:
        """A normal request still gets its answer in time."""
        r = httpx.post(
            self.url + "/api/answer", json={"question": "a b", "max_new_tokens": 2}, timeout=seconds
        )
        return r.status_code == 200 and r.json()["tokens"] == 2


async def _ask(url: str, tokens: int) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as client:
        return await client.post(
            url + "/api/answer", json={"question": "a b", "max_new_tokens": tokens}
        )


def test_sigterm_finishes_the_running_request_and_refuses_the_queued_ones(tmp_path):
    server = SlowServer(tmp_path / "log")

    async def scenario():
        running = asyncio.create_task(_ask(server.url, 40))  # 2 s of generation
        await asyncio.sleep(0.3)
        queued = [asyncio.create_task(_ask(server.url, 40)) for _ in range(5)]
        await asyncio.sleep(0.3)
        started = time.time()
        os.kill(server.proc.pid, signal.SIGTERM)
        replies = await asyncio.gather(*queued)
        refused_after = time.time() - started
        return await running, replies, refused_after

    running, queued, refused_after = asyncio.run(scenario())
    assert [r.status_code for r in queued] == [503] * 5 and refused_after < 1.0
    assert all(r.headers["retry-after"] == "1" and "shutting down" in r.text for r in queued)
    assert running.status_code == 200 and running.json()["tokens"] == 40  # finished, not cut
    assert server.proc.wait(timeout=10) == 0
    assert "server stopped" in server.log.read_text()


def test_a_second_sigterm_stops_waiting_for_the_running_request(tmp_path):
    server = SlowServer(tmp_path / "log", grace_s=60)

    async def scenario():
        running = asyncio.create_task(_ask(server.url, 1000))  # 50 s of generation
        await asyncio.sleep(0.5)
        os.kill(server.proc.pid, signal.SIGTERM)
        await asyncio.sleep(0.5)
        started = time.time()
        os.kill(server.proc.pid, signal.SIGTERM)
        code = await asyncio.get_running_loop().run_in_executor(None, server.proc.wait, 20)
        try:
            await running
        except httpx.HTTPError:
            pass  # the connection ends with the server
        return code, time.time() - started

    code, stopped_after = asyncio.run(scenario())
    assert code == 0 and stopped_after < 5, (code, stopped_after)


def test_idle_and_slow_header_connections_are_closed_and_the_server_keeps_answering(tmp_path):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1300:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    server = SlowServer(tmp_path / "log", head_timeout_s=2.0)
    idle = []
    try:
        for _ in range(1100):  # more than the usual 1,024 descriptor limit
            idle.append(socket.create_connection(("127.0.0.1", server.port)))
        drip = socket.create_connection(("127.0.0.1", server.port))
        drip.sendall(b"POST /api/answer HTTP/1.1\r\nHost: x\r\n")
        assert server.answered_within(5)
        started = time.time()
        while time.time() - started < 4:  # a header byte every 0.2 s: never a complete head
            drip.sendall(b"X")
            time.sleep(0.2)
            drip.settimeout(0.01)
            try:
                if drip.recv(1) == b"":
                    break
            except (TimeoutError, BlockingIOError):
                pass
            except ConnectionResetError:
                break
        else:
            raise AssertionError("a connection dripping its header was never closed")
        for s in idle[:50]:
            s.settimeout(5)
            assert s.recv(1) == b""  # closed by the server after the head deadline
        assert server.answered_within(5)
    finally:
        for s in idle:
            s.close()
        assert server.stop() == 0
    log = server.log.read_text()
    assert len(log) < 20_000 and "Too many open files" not in log, log[-2000:]


def test_repeated_accept_errors_are_logged_once_per_interval():
    import logging

    from megatron_yuyuan.serve.http import _RepeatFilter

    logger = logging.getLogger("test_repeat_filter")
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger.addHandler(Keep())
    logger.propagate = False
    logger.addFilter(_RepeatFilter(every_s=0.5))
    for _ in range(1000):
        logger.error("socket.accept() out of system resource")
    time.sleep(0.6)
    logger.error("socket.accept() out of system resource")
    logger.error("something else")
    assert records[0] == "socket.accept() out of system resource"
    assert records[1].startswith("socket.accept() out of system resource (999 more like it")
    assert records[2:] == ["something else"]
