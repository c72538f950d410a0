"""Starting or joining the Ray cluster every other part of :mod:`d2r.distributed` runs on, and
leaving it (:func:`connect`, :func:`disconnect`).

``connect("local")`` always starts a cluster of its own on this machine (``RAY_ADDRESS`` and a
cluster recorded by ``ray start`` are ignored); any other address is probed first (a TCP connection
and an HTTP/2 handshake with the Ray server behind it), so an address that does not answer raises
:class:`ClusterUnreachableError` within ``timeout`` seconds instead of Ray's own minutes of retries.

``connect(..., log_file=PATH)`` sends what Ray itself writes on this process's stderr (its Python
loggers, the warnings and errors of its C++ core, the output of its workers) to PATH, while
``sys.stderr`` keeps writing where stderr went before: the command line names the file once and
prints nothing else of Ray's. :func:`disconnect` undoes it."""
from __future__ import annotations

import io
import logging
import os
import socket
import sys
import threading
import time

#: seconds :func:`connect` waits for an address to answer (the environment variable
#: ``D2R_RAY_CONNECT_TIMEOUT`` overrides it; so does ``connect(..., timeout=...)``)
DEFAULT_CONNECT_TIMEOUT = 30.0


class ClusterUnreachableError(ConnectionError):
    """No Ray cluster answered at the address within the timeout. `address`: the address tried;
    `timeout`: the seconds waited."""

    def __init__(self, message, address=None, timeout=None):
        super().__init__(message)
        self.address = address
        self.timeout = timeout


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError("d2r.distributed needs Ray: pip install 'd2r[ray]' (or pip install 'ray[data,serve]')") \
            from None
    return ray


def _timeout(timeout) -> float:
    if timeout is None:
        env = os.environ.get("D2R_RAY_CONNECT_TIMEOUT")
        if env is None:
            return DEFAULT_CONNECT_TIMEOUT
        try:
            timeout = float(env)
        except ValueError:
            raise ValueError(f"D2R_RAY_CONNECT_TIMEOUT={env!r}: not a number of seconds") from None
    timeout = float(timeout)
    if not timeout > 0 or timeout != timeout or timeout == float("inf"):
        raise ValueError(f"the connect timeout must be a positive number of seconds, got {timeout}")
    return timeout


def _host_port(address: str):
    """(host, port) of a Ray address (``HOST:PORT``, ``ray://HOST:PORT``, ``[IPv6]:PORT``), or None
    where it names no port (left to Ray)."""
    a = address.split("://", 1)[1] if "://" in address else address
    a = a.split("/", 1)[0]
    if a.startswith("["):
        host, _, rest = a[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = a.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host, int(port)


def _recorded_address():
    """The address `ray.init("auto")` would join: RAY_ADDRESS, else the cluster `ray start` recorded
    on this machine (None where neither is set: Ray then says so at once)."""
    env = os.environ.get("RAY_ADDRESS")
    if env:
        return env
    try:
        from ray._private.utils import read_ray_address   # Ray's record of `ray start --head`

        return read_ray_address()
    except Exception:   # noqa: BLE001 - a Ray without it: leave the lookup to ray.init
        return None


def _probe(address: str, timeout: float) -> None:
    """Raise ClusterUnreachableError unless a Ray server at `address` answers within `timeout` seconds:
    a TCP connection, an HTTP/2 (gRPC) handshake, and for a cluster's GCS address one call."""
    hp = _host_port(address)
    if hp is None:
        return
    host, port = hp

    def unreachable(why):
        return ClusterUnreachableError(
            f"no Ray cluster answered at {address} within {timeout:g} s ({why}); check the address and that the "
            "cluster runs (`ray start --head` on its head node), or use 'local' for a cluster on this machine "
            "(D2R_RAY_CONNECT_TIMEOUT, or connect(..., timeout=...), sets the wait)", address, timeout)

    start = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except socket.timeout:
        raise unreachable("the connection timed out") from None
    except OSError as exc:
        raise unreachable(exc.strerror or str(exc)) from None
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return   # a TLS cluster: a plain handshake would fail; the TCP connection is the probe
    try:
        import grpc
    except ImportError:   # Ray depends on grpcio; without it the TCP connection is the probe
        return
    channel = grpc.insecure_channel(f"{host}:{port}" if ":" not in host else f"[{host}]:{port}",
                                    options=[("grpc.enable_http_proxy", 0)])
    try:
        grpc.channel_ready_future(channel).result(timeout=max(0.1, timeout - (time.monotonic() - start)))
        if "://" in address:
            return   # a Ray Client server (ray://): the handshake is the probe
        # the cluster's GCS: one call it answers at once (with the id, or "unauthenticated" under token auth)
        call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId")
        try:
            call(b"", timeout=max(0.1, timeout - (time.monotonic() - start)))
        except grpc.RpcError as exc:
            code, details = exc.code(), str(exc.details() or "")
            if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                raise unreachable(f"a connection opened but the server did not answer: {code.name}") from None
            if code == grpc.StatusCode.UNIMPLEMENTED and "http2 header with status" in details:
                raise unreachable(f"something answered, but not a Ray server ({details})") from None
            # any other answer came from a gRPC server: Ray (another version's, or asking for a token)
    except grpc.FutureTimeoutError:
        raise unreachable("a connection opened but no Ray (gRPC) server answered on it") from None
    finally:
        channel.close()


# ---- Ray's output into a file ------------------------------------------------------------------------
class _Redirect:
    """File descriptor 2 (where Ray's C++ core and the processes it starts write) to a log file, and
    Ray's Python loggers there too; sys.stderr to a new stream on the original stderr."""

    def __init__(self, path):
        import ray._private.worker as ray_worker   # its printer is redirected below

        self.path = os.fspath(path)
        self.log = open(self.path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
        self.log.write(f"---- d2r: Ray's output, {time.strftime('%Y-%m-%d %H:%M:%S')}, process {os.getpid()} "
                       f"({' '.join(sys.argv[:1] + sys.argv[1:4])})\n")
        self.handler = logging.StreamHandler(self.log)
        self.handler.setLevel(logging.INFO)   # not Ray Data's debug records (it sets its loggers to DEBUG)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.removed = []
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved_stderr = sys.stderr
        self.saved_fd = os.dup(2)
        os.dup2(self.log.fileno(), 2)
        enc = getattr(self.saved_stderr, "encoding", None) or "utf-8"
        sys.stderr = io.TextIOWrapper(io.FileIO(self.saved_fd, "w", closefd=False), encoding=enc,
                                      errors="backslashreplace", line_buffering=True, write_through=True)
        self.lock = threading.Lock()
        # the driver's printer of what the cluster reports to it (task failures, retries, worker output):
        # it writes to sys.stdout, where the results go; into the log instead
        self.worker_module = ray_worker
        self.saved_print = getattr(ray_worker, "print_to_stdstream", None)
        if self.saved_print is not None:
            ray_worker.print_to_stdstream = self.print_to_log
        self.route_loggers()

    def print_to_log(self, data, ignore_prefix=False) -> None:
        with self.lock:
            for line in data.get("lines", ()):
                self.log.write(f"({data.get('pid', '?')}) {line}\n")

    def route_loggers(self) -> None:
        """Ray's loggers (every "ray" and "ray.*" logger that exists now) write to the log file
        instead of a console stream. Called again after Ray Data or Serve configure theirs."""
        names = ["ray"] + [n for n in list(logging.root.manager.loggerDict) if n.startswith("ray.")]
        for name in names:
            lg = logging.getLogger(name)
            console = [h for h in lg.handlers if isinstance(h, logging.StreamHandler)
                       and not isinstance(h, logging.FileHandler) and h is not self.handler]
            for h in console:
                lg.removeHandler(h)
                self.removed.append((lg, h))
            if (console or name == "ray") and self.handler not in lg.handlers:
                lg.addHandler(self.handler)

    def close(self) -> None:
        for lg in [logging.getLogger("ray")] + [lg for lg, _ in self.removed]:
            if self.handler in lg.handlers:
                lg.removeHandler(self.handler)
        for lg, h in self.removed:
            if h not in lg.handlers:
                lg.addHandler(h)
        self.removed = []
        if self.saved_print is not None:
            self.worker_module.print_to_stdstream = self.saved_print
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        sys.stderr = self.saved_stderr
        os.dup2(self.saved_fd, 2)
        os.close(self.saved_fd)
        self.log.close()


_redirect: _Redirect | None = None


def _route_ray_loggers() -> None:
    """After Ray Data or Ray Serve set up their loggers: route them to the log file, if there is one."""
    if _redirect is not None:
        _redirect.route_loggers()


def ray_log_file():
    """The file Ray's output goes to (``connect(..., log_file=...)``), or None."""
    return _redirect.path if _redirect is not None else None


def connect(address: str | None = "local", num_cpus: int | None = None, *, timeout: float | None = None,
            log_file=None, **init_kwargs):
    """Start or join a Ray cluster (once per process; a process already connected keeps its cluster).

    address: "local" (or None) starts one on this machine with `num_cpus` CPUs (default: all), always:
    ``RAY_ADDRESS`` and a cluster started with ``ray start`` are ignored. "auto" joins the cluster
    ``RAY_ADDRESS`` names, else the one running on this machine (``ray start --head``); anything else is
    a Ray address (``HOST:6379`` or ``ray://HOST:10001``). An address is probed before Ray is asked to
    join it: one that does not answer within `timeout` seconds (default
    :data:`DEFAULT_CONNECT_TIMEOUT`, 30, or ``$D2R_RAY_CONNECT_TIMEOUT``) raises
    :class:`ClusterUnreachableError`.

    log_file: a path; Ray's own output in this process (its loggers, its C++ core's messages and the
    processes it starts; its workers' output is not forwarded) is appended there instead of
    stderr, until :func:`disconnect`. Returns the cluster's resources."""
    ray = _ray()
    global _redirect
    if ray.is_initialized():
        return ray.cluster_resources()
    timeout = _timeout(timeout)
    # not Ray's start-up notices on stderr; in a log file, they are the context of what follows
    init_kwargs.setdefault("logging_level", logging.WARNING if log_file is None else logging.INFO)
    local = address in (None, "local")
    if not local:
        if num_cpus is not None:
            raise ValueError("num_cpus is for a local cluster; a running cluster has its own")
        target = _recorded_address() if address == "auto" else address
        if target:
            _probe(target, timeout)
    if log_file is not None:
        init_kwargs.setdefault("log_to_driver", False)   # workers' output stays in Ray's session logs
        if _redirect is None:
            _redirect = _Redirect(log_file)
    saved = os.environ.pop("RAY_ADDRESS", None) if local else None
    try:
        if local:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **init_kwargs)
        else:
            ray.init(address=address, **init_kwargs)
    except BaseException:
        if _redirect is not None:
            _redirect.close()
            _redirect = None
        raise
    finally:
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved
    if _redirect is not None:
        _redirect.route_loggers()
        try:
            where = ray._private.worker._global_node.get_logs_dir_path()   # detail: Ray's per-process logs
            _redirect.log.write(f"---- d2r: Ray's session logs (each process's own): {where}\n")
        except Exception:   # noqa: BLE001 - only a note
            pass
    return ray.cluster_resources()


def disconnect() -> None:
    """Leave the cluster (``ray.shutdown()``: a local cluster this process started stops, its processes
    with it) and send stderr back where it went before ``connect(..., log_file=...)``."""
    global _redirect
    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            ray.shutdown()
    finally:
        if _redirect is not None:
            _redirect.close()
            _redirect = None


def _require_connected():
    ray = _ray()
    if not ray.is_initialized():
        raise RuntimeError("not connected to a Ray cluster: call d2r.distributed.connect('local' | 'auto' | ADDRESS) "
                           "first (the command line's --ray)")
    return ray
