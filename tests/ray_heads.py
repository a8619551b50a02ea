"""Real `ray start --head` clusters for tests, started and removed without touching any other Ray.

Every port is explicit and on loopback; the head gets a marker in its environment (KEY=tag) that every
process of its cluster inherits (daemons, workers, job drivers), so teardown kills exactly those processes:
never `ray stop`, which kills every Ray on the machine (another test's, or a developer's).
Used by the suite's shared head (conftest) and the fake autoscaling cluster of tests/test_cluster_jobs.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marked_processes(key: str, value: str) -> dict[int, str]:
    """pid -> command line of every live process (not this one) whose environment has key=value."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if f"{key}={value}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:150]
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def kill_marked(key: str, value: str) -> dict[int, str]:
    """SIGTERM, then (after up to 3 s) SIGKILL, the processes marked key=value; returns the survivors."""
    for sig, wait_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
        for pid in marked_processes(key, value):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait_s
        while marked_processes(key, value) and time.monotonic() < deadline:
            time.sleep(0.5)
    return marked_processes(key, value)


def start_head(temp_dir: Path, env: dict, marker: str, *, object_store_mb: int | None = None,
               num_cpus: int | None = None, port: int | None = None,
               extra_args: tuple[str, ...] = ()) -> tuple[str, str]:
    """`ray start --head` (dashboard included) in `temp_dir` with `env`, which must hold `marker`; returns
    (GCS address, dashboard URL). The head's processes get RAY_API_SERVER_ADDRESS = its dashboard, so Ray
    Train's PlacementGroupCleaner finds this cluster's state API even with other clusters on the machine.
    `num_cpus`: the head's logical CPUs (default: the machine's); `port`: its GCS port, for a config that must
    name the address before the start (default: a free one); `extra_args` go to `ray start` as they are.

    Under heavy load the raylet can miss Ray's startup deadline ("timed out during startup"): one retry,
    on fresh ports, after killing what the failed attempt left."""
    for _attempt in (1, 2):
        gcs, dashboard = port or free_port(), free_port()
        ports = {flag: free_port() for flag in ("ray-client-server-port", "dashboard-agent-listen-port",
                                                "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                                "metrics-export-port")}
        memory = [f"--object-store-memory={object_store_mb * 2**20}"] if object_store_mb else []
        command = [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--temp-dir={temp_dir}",
                   "--node-ip-address=127.0.0.1", f"--num-cpus={os.cpu_count() if num_cpus is None else num_cpus}",
                   "--include-dashboard=true",
                   "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--port={gcs}",
                   "--disable-usage-stats", *memory, *[f"--{flag}={port}" for flag, port in ports.items()],
                   *extra_args]
        head_env = {**env, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard}"}
        result = subprocess.run(command, env=head_env, capture_output=True, text=True, timeout=180)
        if result.returncode == 0:
            return f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}"
        kill_marked(marker, env[marker])
    raise AssertionError(f"ray start failed twice:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
