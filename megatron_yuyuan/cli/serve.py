"""Serve a QA model over HTTP: an OpenAI-compatible /v1/completions, a QA endpoint /api/answer,
and a web page at /.

    python -m megatron_yuyuan.serve --hf-dir runs/demo/hf --port 8000
    torchrun --nproc-per-node 2 -m megatron_yuyuan.serve --load runs/demo/checkpoints \\
        --tensor-model-parallel-size 2 --port 8000

Rank 0 runs the HTTP server (FastAPI on uvicorn) and schedules every decoding step (requests join
and leave the running batch between steps: :mod:`megatron_yuyuan.serve.scheduler`); the other
TP/PP ranks run the same steps. Ctrl-C or SIGTERM stops every rank. The API is described in
:mod:`megatron_yuyuan.serve.app`.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from megatron_yuyuan.cli import (
    ArgumentParser,
    non_negative_float,
    non_negative_int,
    pick_iteration,
    positive_float,
    positive_int,
    run_cli,
)
from megatron_yuyuan.cli.generate import add_model_arguments, generator_from_args
from megatron_yuyuan.errors import UserError
from megatron_yuyuan.runtime import launch_rank, launch_world_size

API_KEY_ENV = "MEGATRON_YUYUAN_API_KEY"


def check_port(host: str, port: int) -> None:
    """Refuse a port that is taken now, before the model is loaded."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UserError(
                f"--host {host} --port {port}: cannot listen there ({exc.strerror}); choose "
                f"another --port"
            ) from None


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m megatron_yuyuan.serve", description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument(
        "--served-model-name", default=None, help="model id in the API (default: from the path)"
    )
    p.add_argument(
        "--max-batch-size",
        type=positive_int,
        default=None,
        help="requests generated together (default: --batch-size)",
    )
    p.add_argument(
        "--scheduler",
        choices=["continuous", "static"],
        default="continuous",
        help="continuous: requests join the running batch at the next decoding step and leave "
        "when they end; static: a batch is admitted only when the previous one has ended (the "
        "older policy, for comparison)",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=non_negative_float,
        default=10.0,
        help="--scheduler static: how long a batch's first request waits for more",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"require 'Authorization: Bearer KEY' on every endpoint but /health (default: "
        f"${API_KEY_ENV}; prefer the variable: a flag shows in the process list)",
    )
    p.add_argument(
        "--max-queue",
        type=positive_int,
        default=256,
        help="requests waiting at most; more get 503 with Retry-After",
    )
    p.add_argument(
        "--allowed-origins",
        nargs="*",
        default=[],
        help="web origins (e.g. https://app.example.org, or *) whose pages may call the API; "
        "other sites' pages are refused (the server's own page always works)",
    )
    p.add_argument(
        "--max-connections",
        type=non_negative_int,
        default=0,
        help="open connections at most (more get 503); default 0: what the open-files limit "
        "allows (raised to its hard limit at start), at most 8192",
    )
    p.add_argument(
        "--keep-alive-s",
        type=positive_int,
        default=5,
        help="an idle keep-alive connection is closed after this many seconds",
    )
    p.add_argument(
        "--request-head-timeout-s",
        type=positive_float,
        default=10.0,
        help="a connection that sends no complete request head within this many seconds (of "
        "connecting, or of its last answer) is closed: idle and slow-header clients",
    )
    p.add_argument(
        "--shutdown-grace-s",
        type=non_negative_float,
        default=30.0,
        help="on SIGTERM / Ctrl-C: queued requests get 503 at once, running ones may finish "
        "within this many seconds; a second signal stops at once",
    )
    p.add_argument(
        "--log-level",
        default="warning",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn log level",
    )
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        p.error(f"--port {args.port}: use 1..65535")
    if args.api_key is not None and not args.api_key.strip():
        p.error("--api-key: empty; give the key clients must send, or leave it out")

    def body() -> int:
        pick_iteration(args)
        world = launch_world_size()
        if world != args.tensor_model_parallel_size * args.pipeline_model_parallel_size:
            raise UserError(
                f"{world} processes for TP={args.tensor_model_parallel_size} x "
                f"PP={args.pipeline_model_parallel_size}: a server runs one model replica; launch "
                f"exactly TP x PP processes"
            )
        if args.hf_dir and world > 1:
            raise UserError("--hf-dir serves in one process; use --load for TP/PP under torchrun")
        if launch_rank() == 0:
            check_port(args.host, args.port)
        generator = generator_from_args(args)
        from megatron_yuyuan.serve import engine

        if launch_rank() != 0:
            # Ctrl-C / SIGTERM reach every rank; the followers leave when rank 0, which shuts
            # the HTTP server down gracefully, tells them to (a killed follower would leave rank
            # 0 stuck in its next collective).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            engine.follow(generator, args.max_batch_size or args.batch_size)
            return 0
        return serve(generator, args)

    return run_cli(body)


def serve(generator, args) -> int:
    from megatron_yuyuan.serve.app import ServedModel, create_app
    from megatron_yuyuan.serve.engine import Engine
    from megatron_yuyuan.serve.http import run_server
    from megatron_yuyuan.serve.scheduler import Scheduler

    source = args.load or args.hf_dir
    path = Path(source).resolve()
    if path.name.startswith("iter_"):  # name the run, not its folders
        path = path.parent
    if path.name == "checkpoints":
        path = path.parent
    name = args.served_model_name or path.name
    slots = args.max_batch_size or args.batch_size
    eng = Engine(generator, slots)
    scheduler = Scheduler(eng, slots, args.max_queue, args.scheduler, wait_ms=args.batch_wait_ms)
    layout = f"TP={args.tensor_model_parallel_size}, PP={args.pipeline_model_parallel_size}"
    app = create_app(
        scheduler,
        generator.tokenizer,
        ServedModel(name, str(source), layout, generator.template, generator.decoding),
        allowed_origins=args.allowed_origins,
        api_key=args.api_key,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(
            f"warning: --host {args.host} makes the API reachable from other machines and it "
            f"has no authentication; set $MEGATRON_YUYUAN_API_KEY (or --api-key), or put it behind "
            f"an authenticating proxy or a firewall",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"> serving {name} ({layout}, {args.scheduler} batching of up to {slots}) from {source} "
        f"at http://{args.host}:{args.port}/" + (" (API key required)" if args.api_key else ""),
        flush=True,
    )
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, restores the handlers it found and then
    # re-raises the signal; with these no-op handlers the re-raise returns here, so the followers
    # are released and the process exits 0 instead of dying of the signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        run_server(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            max_connections=args.max_connections,
            keep_alive_s=args.keep_alive_s,
            head_timeout_s=args.request_head_timeout_s,
            grace_s=args.shutdown_grace_s,
            on_signal=scheduler.drain,
        )
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # another signal now stops a stuck exit
            signal.signal(sig, signal.SIG_DFL)
        eng.shutdown()  # the followers leave their loop
    print("> server stopped", flush=True)
    return 0
