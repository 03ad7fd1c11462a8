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

from conftest import transformers_logprobs, write_gpt2
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


def expected(
    models: Path, source: list[str], name: str, tokens: int = NEW_TOKENS, flags: tuple = ()
) -> list[dict]:
    """`python -m megatron_yuyuan.generate` answers, one question at a time (batch size 1)."""
    inp, out = models / "questions.jsonl", models / f"expected_{name}.jsonl"
    inp.write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS))
    cmd = [sys.executable, "-m", "megatron_yuyuan.generate", *source, "--input", str(inp)]
    cmd += ["--output", str(out), "--batch-size", "1", "--max-new-tokens", str(tokens), *flags]
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


def browser_check(url: str, answer: str, tmp_path: Path, api_key: str | None = None) -> None:
    """Headless Chromium types a question (and the API key), submits, waits for the streamed
    answer."""
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
        if api_key is not None:
            page.click("#submit")  # without the key first: the page says it needs one
            page.wait_for_selector("#status.error", timeout=60_000)
            assert "API key" in page.inner_text("#status")
            page.fill("#api_key", api_key)
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


# --- the serving engine: continuous batching, mixed settings, logprobs, keys, metrics -------------
LONG = 30
PENALTIES = {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3}
KEY = "s3cret-key-for-tests"


def mixed_wants(models: Path, source: list[str], name: str) -> dict:
    """`generate` alone for each greedy setting the mixed workload uses."""
    flags = ("--repetition-penalty", "1.3", "--no-repeat-ngram-size", "3")
    return {
        "short": expected(models, source, f"{name}_short"),
        "long": expected(models, source, f"{name}_long", LONG),
        "penalties": expected(models, source, f"{name}_pen", NEW_TOKENS, flags),
    }


def mixed_workload(url: str, wants: dict, headers: dict | None = None, n: int = 64) -> None:
    """``n`` concurrent requests of mixed lengths and settings (a quarter sampled, each with its
    own temperature / top-k / top-p / seed): every greedy answer equals `generate` alone, every
    seeded sample equals the same request sent alone."""
    import random

    rng = random.Random(0)
    bodies, kinds = [], []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)]
        if i % 4 == 3:
            kinds.append(None)
            bodies.append(
                {
                    "question": q,
                    "max_new_tokens": rng.randint(4, 40),
                    "temperature": rng.choice([0.7, 1.0, 1.3]),
                    "top_k": rng.choice([0, 20]),
                    "top_p": rng.choice([1.0, 0.9]),
                    "seed": rng.randint(0, 10**9),
                }
            )
        else:
            kind = rng.choice(["short", "long", "penalties"])
            kinds.append(kind)
            body = {"question": q, "max_new_tokens": LONG if kind == "long" else NEW_TOKENS}
            bodies.append({**body, **(PENALTIES if kind == "penalties" else {})})

    async def send(items):
        async with httpx.AsyncClient(timeout=300, headers=headers) as client:
            return await asyncio.gather(*(client.post(url + "/api/answer", json=b) for b in items))

    replies = asyncio.run(send(bodies))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies][:3]
    for i, (body, kind, r) in enumerate(zip(bodies, kinds, replies)):
        got = r.json()
        if kind is not None:
            w = wants[kind][i % len(QUESTIONS)]
            assert (got["answer"], got["tokens"]) == (w["prediction"], w["new_tokens"]), (i, kind)
        else:
            alone = httpx.post(url + "/api/answer", json=body, headers=headers, timeout=120)
            assert got == alone.json(), (i, body)
            assert got["tokens"] == body["max_new_tokens"]  # peaked weights: no early EOS


def short_finishes_first(url: str, headers: dict | None = None) -> None:
    """A short request sent while a long one is decoding finishes before the long one."""
    finished = {}

    async def scenario():
        async with httpx.AsyncClient(timeout=300, headers=headers) as client:

            async def long():
                body = {"question": QUESTIONS[0], "max_new_tokens": 100, "stream": True}
                async with client.stream("POST", url + "/api/answer", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: ") and not started.done():
                            started.set_result(True)
                finished["long"] = time.monotonic()

            started = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(long())
            await started  # the long one is decoding now
            body = {"question": QUESTIONS[1], "max_new_tokens": 3}
            r = await client.post(url + "/api/answer", json=body)
            assert r.status_code == 200 and r.json()["tokens"] == 3
            finished["short"] = time.monotonic()
            await task

    asyncio.run(scenario())
    assert finished["short"] < finished["long"], finished


@pytest.fixture(scope="module")
def keyed_server(models, tmp_path_factory):
    """A server over the HF directory that needs an API key (from the environment)."""
    log = tmp_path_factory.mktemp("keyed") / "keyed.log"
    os.environ["MEGATRON_YUYUAN_API_KEY"] = KEY
    try:
        server = Server(
            ["--hf-dir", str(models / "hf"), "--batch-size", "8"], [sys.executable], log
        )
    finally:
        del os.environ["MEGATRON_YUYUAN_API_KEY"]
    yield server
    server.stop()


def test_api_key_is_required_everywhere_but_health(keyed_server):
    url, auth = keyed_server.url, {"Authorization": f"Bearer {KEY}"}
    ask = {"question": QUESTIONS[0], "max_new_tokens": 2}
    for headers in (
        {},
        {"Authorization": "Bearer " + "x" * len(KEY)},  # wrong key, same length
        {"Authorization": "Bearer short"},  # another length
        {"Authorization": KEY},  # no scheme
        {"Authorization": f"Basic {KEY}"},
    ):
        for method, path, body in (
            ("POST", "/api/answer", ask),
            ("POST", "/v1/completions", {"prompt": "x"}),
            ("GET", "/v1/models", None),
            ("GET", "/metrics", None),
        ):
            r = httpx.request(method, url + path, json=body, headers=headers)
            assert r.status_code == 401, (headers, path, r.text)
            assert r.headers["www-authenticate"] == "Bearer" and "API key" in r.text
    assert httpx.post(url + "/api/answer", json=ask, headers=auth).status_code == 200
    assert httpx.get(url + "/v1/models", headers=auth).status_code == 200
    assert httpx.get(url + "/health").status_code == 200
    assert 'id="api_key"' in httpx.get(url + "/").text  # the page asks for it


def test_metrics_count_exactly_the_requests_sent(keyed_server):
    from prometheus_client.parser import text_string_to_metric_families

    url, auth = keyed_server.url, {"Authorization": f"Bearer {KEY}"}

    def scrape() -> dict:
        text = httpx.get(url + "/metrics", headers=auth).text
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                values[key] = sample.value
        return values

    def delta(after, before, name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    before = scrape()
    replies = [
        httpx.post(url + "/api/answer", json={"question": q, "max_new_tokens": 4}, headers=auth)
        for q in QUESTIONS[:5]
    ]
    assert all(r.status_code == 200 for r in replies)
    bad = [httpx.post(url + "/api/answer", json={"question": ""}, headers=auth) for _ in range(2)]
    assert [r.status_code for r in bad] == [422, 422]
    assert httpx.post(url + "/api/answer", json={"question": "x"}).status_code == 401
    after = scrape()
    answer = {"endpoint": "/api/answer"}
    assert delta(after, before, "yuyuan_requests_total", **answer, status="200") == 5
    assert delta(after, before, "yuyuan_requests_total", **answer, status="422") == 2
    assert delta(after, before, "yuyuan_requests_total", **answer, status="401") == 1
    assert delta(after, before, "yuyuan_generation_tokens_total") == sum(
        r.json()["tokens"] for r in replies
    )
    assert delta(after, before, "yuyuan_time_to_first_token_seconds_count") == 5
    assert delta(after, before, "yuyuan_time_per_output_token_seconds_count") == 5
    assert delta(after, before, "yuyuan_prompt_tokens_total") > 5 * 5
    assert after[("yuyuan_queue_length", ())] == 0
    assert after[("yuyuan_running_batch_size", ())] == 0


def test_logprobs_and_n_through_the_api(keyed_server, models):
    from transformers import GPT2LMHeadModel

    from megatron_yuyuan.tokenizer import load_tokenizer

    url, auth = keyed_server.url, {"Authorization": f"Bearer {KEY}"}
    prompt = f"Question:{QUESTIONS[2]} answer:"
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 3}
    r = httpx.post(url + "/v1/completions", json=body, headers=auth)
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"][0] == 0 and lp["text_offset"][1] == len(lp["tokens"][0])
    tok = load_tokenizer(str(models / "hf"))
    model = GPT2LMHeadModel.from_pretrained(str(models / "hf")).eval()
    new, references = transformers_logprobs(model, tok.encode(prompt), 6, tok.eod)
    assert [tok.decode([t]) for t in new] == lp["tokens"]
    for reference in references:
        for step, t in enumerate(new):
            assert abs(lp["token_logprobs"][step] - reference[step, t].item()) < 1e-5
            best = reference[step].topk(3)
            want = {tok.decode([int(i)]): v for i, v in zip(best.indices, best.values.tolist())}
            got = lp["top_logprobs"][step]
            assert got.keys() == want.keys()
            assert all(abs(got[k] - want[k]) < 1e-5 for k in want)
    # a stop string: the log-probabilities and the usage end where the text does
    stop = lp["tokens"][3].strip()
    if stop:
        cut = httpx.post(url + "/v1/completions", json={**body, "stop": stop}, headers=auth).json()
        lp_cut = cut["choices"][0]["logprobs"]
        assert cut["choices"][0]["finish_reason"] == "stop"
        assert len(lp_cut["tokens"]) == cut["usage"]["completion_tokens"] <= 4
        assert lp_cut["tokens"] == lp["tokens"][: len(lp_cut["tokens"])]
    # n=3: three choices per prompt, sampled ones differ by seed (seed + j), each reproducible
    body = {"prompt": [prompt, "Question:hi answer:"], "max_tokens": 5, "n": 3, "seed": 5}
    r = httpx.post(url + "/v1/completions", json=body, headers=auth).json()
    assert [c["index"] for c in r["choices"]] == list(range(6))
    texts = [c["text"] for c in r["choices"]]
    assert len(set(texts[:3])) > 1
    one = {**body, "prompt": prompt, "n": 1, "seed": 6}
    again = httpx.post(url + "/v1/completions", json=one, headers=auth)
    assert again.json()["choices"][0]["text"] == texts[1]
    greedy = httpx.post(url + "/v1/completions", json={**body, "temperature": 0}, headers=auth)
    assert len({c["text"] for c in greedy.json()["choices"][:3]}) == 1


def test_hf_server_mixed_workload_and_short_before_long(keyed_server, models):
    auth = {"Authorization": f"Bearer {KEY}"}
    wants = mixed_wants(models, ["--hf-dir", str(models / "hf")], "hf_mixed")
    mixed_workload(keyed_server.url, wants, auth)
    short_finishes_first(keyed_server.url, auth)


def test_web_page_with_an_api_key_in_headless_chromium(keyed_server, models, tmp_path):
    want = expected(models, ["--hf-dir", str(models / "hf")], "hf_page")
    browser_check(keyed_server.url, want[0]["prediction"], tmp_path, api_key=KEY)


def test_megatron_tp2_server_mixed_workload(models, tmp_path):
    wants = mixed_wants(models, ["--load", str(models / "mc")], "mc_mixed")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launcher += ["--master-port", str(free_port())]
    args = ["--load", str(models / "mc"), "--tensor-model-parallel-size", "2", "--batch-size", "8"]
    server = Server(args, launcher, tmp_path / "tp2_mixed.log")
    try:
        mixed_workload(server.url, wants)
        short_finishes_first(server.url)
    finally:
        server.stop(signal.SIGINT)
    assert "server stopped" in (tmp_path / "tp2_mixed.log").read_text()


def test_static_scheduler_answers_the_same(models, tmp_path):
    want = expected(models, ["--load", str(models / "mc")], "mc_static")
    args = ["--load", str(models / "mc"), "--scheduler", "static"]
    server = Server(args, [sys.executable], tmp_path / "static.log")
    try:
        check_answers(server.url, want)
        assert httpx.get(server.url + "/health").json()["scheduler"] == "static"
    finally:
        assert server.stop() == 0
