"""A real local Ray cluster for tests: `ray start --head` on 127.0.0.1 with its own temp
dir and ports, stopped by killing exactly the processes it started (never `ray stop`)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


# Ray's fixed defaults (GCS, dashboard, client server, dashboard agent): an embedded Ray
# binds 52365 while a LocalRay may be up on the other xdist worker (conftest's groups)
RAY_DEFAULT_PORTS = frozenset({6379, 8265, 10001, 52365})


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free now, none of them a port Ray binds by default."""
    socks, ports = [], []
    while len(ports) < n:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)  # held until all are drawn: the kernel hands out each port once
        if s.getsockname()[1] not in RAY_DEFAULT_PORTS:
            ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class LocalRay:
    def __init__(self, num_cpus: int = 2, num_gpus: int = 0, env: dict | None = None,
                 bin_dir: Path | str | None = None):
        """`bin_dir`: the bin/ of the Python environment whose `ray` starts the cluster (default:
        this interpreter's). `env` entries whose value is None are removed from the environment."""
        # short path: Ray's unix sockets live under the temp dir (108-byte limit)
        self.temp_dir = tempfile.mkdtemp(prefix="pp-ray-", dir="/tmp")
        (self.gcs_port, self.dash_port, self.client_port, self.nm_port, self.om_port,
         self.agent_port, self.metrics_port, self.rte_port, self.agent_grpc) = free_ports(9)
        fixed = (self.gcs_port, self.dash_port, self.client_port, self.nm_port, self.om_port,
                 self.agent_port, self.metrics_port, self.rte_port, self.agent_grpc)
        while True:  # a worker-port range that none of the fixed ports falls into
            lo = 20000 + free_ports(1)[0] % 20000
            if not any(lo <= p <= lo + 200 for p in fixed):
                break
        self.min_worker, self.max_worker = lo, lo + 200
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        # auth is explicit: a token file left in ~/.ray by any embedded ray.init() would
        # otherwise switch token auth on for `ray start` too
        self.bin_dir = Path(bin_dir) if bin_dir is not None else BIN
        merged = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_worker_niceness": "0", **(env or {})}
        self.env = {k: v for k, v in merged.items() if v is not None}
        self.env.pop("RAY_ADDRESS", None)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dash_port}"

    def start(self) -> "LocalRay":
        cmd = [str(self.bin_dir / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
               f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dash_port}",
               f"--ray-client-server-port={self.client_port}", f"--node-manager-port={self.nm_port}",
               f"--object-manager-port={self.om_port}", f"--dashboard-agent-listen-port={self.agent_port}",
               f"--dashboard-agent-grpc-port={self.agent_grpc}", f"--metrics-export-port={self.metrics_port}",
               f"--runtime-env-agent-port={self.rte_port}", f"--min-worker-port={self.min_worker}",
               f"--max-worker-port={self.max_worker}", f"--temp-dir={self.temp_dir}",
               f"--num-cpus={self.num_cpus}", f"--num-gpus={self.num_gpus}", "--disable-usage-stats"]
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180)
        if r.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed:\n{r.stdout}\n{r.stderr}")
        try:
            self._wait_dashboard()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_dashboard(self, timeout: float = 90) -> None:
        import urllib.error
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except urllib.error.HTTPError as e:
                if e.code == 401:  # up, and asking for the token
                    return
                time.sleep(0.5)
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("Ray dashboard did not come up")

    def pids(self) -> list[int]:
        """Processes of this cluster: their command lines name its private temp dir or ports."""
        marks = (self.temp_dir, f"--gcs-address=127.0.0.1:{self.gcs_port}", f"127.0.0.1:{self.gcs_port}")
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(m in cmdline for m in marks):
                out.append(int(d.name))
        return out

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to what is left. The dashboard and log monitor end on
        SIGTERM within a second; the GCS server, the raylet and the autoscaler monitor were
        still up 12 s after it (Ray 2.60), so they get 3 s, not the 10 s they waited before
        every stop for nothing."""
        for sig, grace in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + grace
            while pids and time.time() < deadline and self.pids():
                time.sleep(0.3)
            if not self.pids():
                break

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
