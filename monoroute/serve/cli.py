"""`monoroute serve RUN [RUN ...]`: the unit browser on http://127.0.0.1:8000/."""
from __future__ import annotations

import errno
import socket
import sys

from monoroute.errors import MonorouteError


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="browse analysed runs' units in a web browser (reads RUN/analysis/)")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories analysed by `monoroute analyze`")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it to the network)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="another host name the browser may use to reach the server (the Host header is checked)")
    p.add_argument("--analyze", action="store_true", help="run `monoroute analyze` first on runs that lack it")
    p.add_argument("--analyze-tokens", type=int, default=200_000, help="positions --analyze scores (default 200000)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_serve)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a port in use is one clear error line."""
    if not 0 < port < 65536:
        raise MonorouteError(f"--port must be between 1 and 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise MonorouteError(f"cannot resolve --host {host!r} ({exc.strerror}); use e.g. 127.0.0.1") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise MonorouteError(f"port {port} on {host} is already in use; pass --port with a free port "
                                 f"(or stop the server using it)") from None
        raise MonorouteError(f"cannot listen on {host}:{port} ({exc.strerror})") from None
    sock.listen(128)
    return sock


def open_stores(runs: list[str], analyze_missing: bool, device: str, analyze_tokens: int = 200_000) -> list:
    """One AnalysisStore per run; with analyze_missing, runs without a usable analysis are analysed
    first (with analyze's progress bars)."""
    from pathlib import Path

    from monoroute.interp.store import AnalysisStore

    stores = []
    for run in runs:
        report = Path(run) / "analysis" / "report.json"
        if analyze_missing and Path(run).is_dir():
            try:
                AnalysisStore(run, device)
            except MonorouteError:
                from monoroute.interp.analyze import AnalyzeOptions, analyze

                print(f"monoroute serve: analysing {run} (no usable analysis at {report})", file=sys.stderr)
                analyze(run, AnalyzeOptions(device=device, tokens=analyze_tokens))
        stores.append(AnalysisStore(run, device))
    return stores


def cmd_serve(args) -> int:
    import uvicorn

    from monoroute.serve.app import allowed_hosts, create_app

    sock = bind(args.host, args.port)  # before the slow loading: a busy port fails at once
    try:
        stores = open_stores(args.runs, args.analyze, args.device, args.analyze_tokens)
        for store in stores:
            print(f"monoroute serve: loading {store.run} ({', '.join(store.set_names)}, layer {store.layer})",
                  file=sys.stderr)
            store.warm()
            _ = store.model
        app = create_app(stores, allowed_hosts(args.host, args.port, args.allow_host))
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"monoroute serve: http://{host}:{args.port}/  ({len(stores)} run(s); Ctrl-C stops)", file=sys.stderr)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"monoroute serve: warning: bound to {args.host}, reachable from other machines", file=sys.stderr)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0


class BackgroundServer:
    """The app served by uvicorn in a thread on a free port of 127.0.0.1: for tests and `bench serve`.

        with BackgroundServer(create_app(stores)) as url: ...   # url = "http://127.0.0.1:PORT"
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app, self.host, self.port = app, host, port

    def __enter__(self) -> str:
        import threading
        import time

        import uvicorn

        self.sock = bind(self.host, self.port) if self.port else _free_socket(self.host)
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the background server did not start")
            time.sleep(0.02)
        return f"http://{self.host}:{self.sock.getsockname()[1]}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def _free_socket(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(128)
    return sock
