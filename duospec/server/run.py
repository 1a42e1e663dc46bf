"""`duospec serve`: load the pair, warm up, listen, and stop cleanly on Ctrl-C or SIGTERM (exit 0)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from typing import Callable

from duospec.config import DuospecError
from duospec.drafting import METHODS

LOOPBACK = "127.0.0.1"
GRACEFUL_SHUTDOWN_SECONDS = 30  # then uvicorn cancels what still runs (a cancelled generation stops at its round)


def add_serve_command(commands: argparse._SubParsersAction) -> None:
    from duospec.cli_options import add_model_arguments

    serve = commands.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (chat and text completions, streaming) on one loaded model pair",
        description="Serve the OpenAI API (POST /v1/chat/completions, POST /v1/completions, GET /v1/models) plus GET /health "
        "and GET /metrics (Prometheus). Up to --max-batch requests generate at once (continuous batching: their passes join); "
        "up to --max-queue more wait, more than that get 503 with Retry-After.",
    )
    group = serve.add_argument_group("server")
    group.add_argument("--host", default=LOOPBACK, help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    group.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one and prints it)")
    group.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 (default: $DUOSPEC_API_KEY if set, else no key)")
    group.add_argument("--served-model-name", default=None, help="the model id clients send and /v1/models lists (default: the target's name)")
    group.add_argument("--method", default="auto", help=f"method of requests that name none (a request's 'method' field overrides it): {', '.join(METHODS)} (default auto)")
    group.add_argument("--max-queue", type=int, default=8, help="requests that may wait beyond the running ones; more get 503 (default 8)")
    group.add_argument(
        "--max-batch", type=int, default=None,
        help="requests that generate at once, their passes joined (continuous batching); on llama.cpp each gets --ctx-size cells "
        "(default: chosen from the measured cost curve, the smallest batch within 90%% of the best tokens/s up to 16; 1 with --method duo or --deterministic)",
    )
    group.add_argument("--max-tokens", type=int, default=4096, help="the most tokens a request may ask for; also the default, within the context (default 4096)")
    group.add_argument("--max-prompt-tokens", type=int, default=None, help="the longest prompt accepted, in tokens (default: the context minus one)")
    group.add_argument("--max-body-bytes", type=int, default=2_000_000, help="the largest request body accepted (default 2000000)")
    group.add_argument("--request-timeout", type=float, default=30.0, help="seconds a client has to send a request's head, and again its body; slower gets 408 and the connection closes (default 30)")
    group.add_argument("--max-connections", type=int, default=1024, help="open connections (and requests in flight) at once; a request beyond gets 503 (default 1024)")
    group.add_argument("--allow-special-tokens", action="store_true", help="parse control-token text in prompts and message contents (<|im_end|>, ...) as control tokens, as before; by default it is plain text")
    group.add_argument("--verbose", action="store_true", help="print each request's budget choice (costs, method) too")
    add_model_arguments(serve)
    serve.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as missing:
        raise DuospecError(f"duospec serve needs FastAPI, uvicorn and prometheus-client ({missing.name} is missing): pip install 'duospec[serve]'") from None
    from duospec.cli_options import load_pipeline
    from duospec.server.app import ServerSettings, create_app
    from duospec.server.connections import uvicorn_config

    _check_flags(args)
    api_key = args.api_key if args.api_key is not None else os.environ.get("DUOSPEC_API_KEY") or None
    listener = _listen(args.host, args.port)  # before loading: a taken port costs no loading time
    _configure_logging()
    if args.host not in (LOOPBACK, "localhost", "::1"):
        print(f"duospec: warning: listening on {args.host}: other machines can reach this server" + ("" if api_key else "; consider --api-key"), file=sys.stderr)
    pipe = load_pipeline(args)
    pipe.verbose = args.verbose
    try:
        _warm_up(pipe, args.method)
        max_batch = _max_batch(pipe, args)
        settings = ServerSettings(
            model_name=args.served_model_name or pipe.target_source,
            method=args.method,
            api_key=api_key,
            max_queue=args.max_queue,
            max_batch=max_batch,
            max_tokens=args.max_tokens,
            max_prompt_tokens=args.max_prompt_tokens,
            max_body_bytes=args.max_body_bytes,
            request_timeout=args.request_timeout,
            max_connections=args.max_connections,
            allow_special_tokens=args.allow_special_tokens,
        )
        app = create_app(pipe, settings)
        config = uvicorn_config(app, settings, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)
        server = _graceful_server(config, on_exit=_shutdown_callback(app.state.duospec))
        host, port = listener.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"duospec: serving {settings.model_name!r} on http://{shown}:{port}/v1 (default method {args.method}, batch {max_batch}, queue {args.max_queue}); Ctrl-C stops", file=sys.stderr, flush=True)
        server.run(sockets=[listener])
    finally:
        pipe.close()  # no draft process outlives the server
        listener.close()
    print("duospec: server stopped", file=sys.stderr)
    return 0


def _check_flags(args: argparse.Namespace) -> None:
    """Flag mistakes fail before any model loads."""
    if args.method not in METHODS:
        raise DuospecError(f"unknown method {args.method!r} for --method; choose one of: {', '.join(METHODS)}")
    if not 0 <= args.port <= 65535:
        raise DuospecError(f"--port must be in 0..65535, got {args.port}")
    from duospec.batching import MAX_LANES

    if args.max_batch is not None and not 1 <= args.max_batch <= MAX_LANES:
        raise DuospecError(f"--max-batch must be in 1..{MAX_LANES}, got {args.max_batch}")
    if args.method == "duo" and (args.max_batch or 1) > 1:
        raise DuospecError("--method duo runs one request at a time (its draft process needs the cores a batch keeps busy); serve it with --max-batch 1, or pick another --method")
    for flag, value, low in (("--max-queue", args.max_queue, 0), ("--max-tokens", args.max_tokens, 1), ("--max-body-bytes", args.max_body_bytes, 1024), ("--max-connections", args.max_connections, 1)):
        if value < low:
            raise DuospecError(f"{flag} must be at least {low}, got {value}")
    if not 0 < args.request_timeout <= 24 * 3600:  # NaN fails this too
        raise DuospecError(f"--request-timeout must be a number of seconds above 0 (at most a day), got {args.request_timeout}")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise DuospecError(f"--max-prompt-tokens must be at least 1, got {args.max_prompt_tokens}")
    from duospec.models.registry import DEFAULT_TARGET

    if METHODS[args.method].needs_draft_model and args.draft is None and (args.target or DEFAULT_TARGET) != DEFAULT_TARGET:
        raise DuospecError(f"--method {args.method} needs a draft model and --target {args.target} comes without one; pass --draft, or choose ar, pld or auto")
    if args.api_key is not None and not args.api_key.strip():
        raise DuospecError("--api-key is empty; give a key, or leave the flag out to serve without one")


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (uvicorn serves on it), or a clear error when it cannot be had."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(128)
    except OSError as error:
        raise DuospecError(f"cannot listen on {host}:{port} ({error.strerror or error}); pick another --port (or --host)") from None
    listener.set_inheritable(True)
    return listener


def _configure_logging() -> None:
    """Request lines on stderr: 'time duospec.server: <id> <endpoint> <status> method=... tokens ...',
    with control characters escaped (duospec/server/logs.py: a client cannot forge a line)."""
    from duospec.server.logs import install_log_escaping

    logger = logging.getLogger("duospec.server")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    install_log_escaping(("duospec.server",))


def _warm_up(pipe, method: str) -> None:
    """Before listening: measure the costs every method a request may name needs (once per machine,
    kept on disk; engines/start.py's measure_costs), then one short generation with the default
    method, so that no request's time holds a measurement or a model load."""
    from duospec.engines.start import measure_costs

    measured = measure_costs(pipe, list(METHODS), method)
    print(f"duospec: costs ready before serving: {', '.join(measured)}", file=sys.stderr, flush=True)
    pipe.generate(pipe.encode("Hello", chat=False), method=method, max_new_tokens=4, temperature=0.0)


def _max_batch(pipe, args: argparse.Namespace) -> int:
    """--max-batch, or its default from the measured cost curve (1 where batching cannot run)."""
    from duospec.batching import batch_choice_note, check_batchable, default_max_batch

    if args.max_batch is not None:
        check_batchable(pipe, args.max_batch)
        return args.max_batch
    if args.method == "duo":
        return 1
    try:
        check_batchable(pipe, 2)
    except DuospecError:  # a target that cannot batch (deterministic, offloaded) serves one at a time
        return 1
    profile = pipe.costs.target_profile()
    chosen = default_max_batch(profile)
    print(f"duospec: {batch_choice_note(profile, chosen)}", file=sys.stderr, flush=True)
    return chosen


def _shutdown_callback(state) -> Callable[[], None]:
    """What a signal handler may do: hand begin_shutdown to the event loop (it takes locks that the
    interrupted code could hold)."""

    def on_exit() -> None:
        if state.loop is not None:
            state.loop.call_soon_threadsafe(state.scheduler.begin_shutdown)
        else:  # before start-up finished: nothing is queued or running
            state.scheduler.closing = True

    return on_exit


def _graceful_server(config, on_exit: Callable[[], None]):
    """uvicorn's Server, except that Ctrl-C/SIGTERM cancel the generation in flight at its next round
    and the process exits 0 (uvicorn re-raises the caught signal after shutting down, which would
    exit 130 or die by SIGTERM)."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            if not self.should_exit:
                # os.write, not print: print is not reentrant, and the signal may interrupt a log line
                os.write(2, f"\nduospec: {signal.Signals(sig).name}: stopping (the request in flight ends at its next round)\n".encode())
                on_exit()
                self.should_exit = True
            elif sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting for connections

    return GracefulServer(config)
