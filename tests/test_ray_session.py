"""Starting Ray never hangs on a dead head: RAY_ADDRESS is joined or refused in ~30 s, a dead address file
falls back to a local Ray with one line naming the address and the fix, a live one is joined.

The decision is tested against real sockets (a closed port, a listening one) and an address file in a
temporary directory (`ray_session.ADDRESS_FILE`, or RAY_TMPDIR for a whole subprocess): the machine's own
`/tmp/ray/ray_current_cluster` is never touched.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rayalign import ray_session
from rayalign.cli import main
from rayalign.config import ConfigError
from rayalign.ray_session import choose_address, host_port

REPO = Path(__file__).resolve().parents[1]


def closed_port() -> int:
    with socket.socket() as sock:  # bound then closed: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def listening():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def address_file(tmp_path: Path, address: str) -> Path:
    path = tmp_path / "ray_current_cluster"
    path.write_text(address + "\n")
    return path


def test_host_port_reads_the_address_forms():
    assert host_port("10.0.0.1:6379") == ("10.0.0.1", 6379)
    assert host_port("ray://head:10001") == ("head", 10001)
    assert host_port("http://127.0.0.1:8265/") == ("127.0.0.1", 8265)
    assert host_port("[::1]:6379") == ("::1", 6379)
    assert host_port("head") is None


def test_a_dead_address_file_falls_back_to_a_local_ray_saying_so(tmp_path):
    dead = f"127.0.0.1:{closed_port()}"
    file = address_file(tmp_path, dead)
    started = time.monotonic()
    address, warning = choose_address(None, file)
    assert time.monotonic() - started < 10
    assert address == "local"
    assert dead in warning and str(file) in warning and "ray stop --force" in warning and "\n" not in warning


def test_a_live_address_file_is_joined(tmp_path, listening):
    assert choose_address(None, address_file(tmp_path, listening)) == (listening, None)
    assert choose_address(None, tmp_path / "missing") == ("local", None)


def test_an_unreachable_ray_address_fails_in_time_naming_it(tmp_path, listening):
    dead = f"127.0.0.1:{closed_port()}"
    started = time.monotonic()
    with pytest.raises(ConfigError, match=f"RAY_ADDRESS: no Ray cluster answers at {dead}.*unset RAY_ADDRESS"):
        choose_address(dead, tmp_path / "missing", wait_s=2)
    assert time.monotonic() - started < 6
    assert choose_address(listening, tmp_path / "missing") == (listening, None)
    assert choose_address("local", address_file(tmp_path, listening)) == ("local", None)
    with pytest.raises(ConfigError, match="RAY_ADDRESS: auto finds no running Ray cluster"):
        choose_address("auto", address_file(tmp_path, dead), wait_s=2)


def test_the_cli_reports_an_unreachable_ray_address_in_one_line(tmp_path, capsys, monkeypatch, tiny_model_dir):
    dead = f"127.0.0.1:{closed_port()}"
    monkeypatch.setenv("RAY_ADDRESS", dead)
    monkeypatch.setattr(ray_session, "WAIT_S", 2.0)
    code = main(["generate", f"model.policy={tiny_model_dir}", f"run.dir={tmp_path / 'r'}", "loop.iterations=1",
                 "loop.prompts_per_iteration=2"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"RAY_ADDRESS: no Ray cluster answers at {dead}" in err


@pytest.mark.slow
def test_ray_starts_locally_despite_a_dead_head_in_the_address_file():
    """The hang itself: plain `ray.init()` retried the dead address for minutes; now a local Ray in seconds."""
    with tempfile.TemporaryDirectory(prefix="rs", dir="/tmp") as tmp:  # short: Ray's socket paths live here
        dead = f"127.0.0.1:{closed_port()}"
        (Path(tmp) / "ray").mkdir()
        (Path(tmp) / "ray" / "ray_current_cluster").write_text(dead + "\n")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=tmp, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
        env.pop(ray_session.PREEMPTION_WATCHER_ENV, None)
        code = ("from rayalign.train import ensure_ray; ensure_ray(); import os, ray; "
                "print('cpus', ray.cluster_resources()['CPU']); ray.shutdown(); "
                f"print('watcher', os.environ.get({ray_session.PREEMPTION_WATCHER_ENV!r}))")
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                                timeout=150)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "cpus" in result.stdout
        assert "watcher 0" in result.stdout  # a local Ray: Ray Train's preemption watcher is off
        assert f"no Ray answers at {dead}" in result.stderr and "ray stop --force" in result.stderr
        print(f"local Ray up in {time.monotonic() - started:.0f} s")


@pytest.mark.parametrize(("ray_address", "user_value", "expected"), [
    ("local", None, "0"),  # the whole cluster is this machine: nothing to be preempted
    ("local", "1", "1"),  # the user's choice is kept
    ("joined", None, None),  # a cluster keeps Ray Train's default (on): its nodes can be drained
])
def test_preemption_watcher_is_off_only_on_a_local_ray(monkeypatch, listening, ray_address, user_value, expected):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setenv("RAY_ADDRESS", listening if ray_address == "joined" else "local")
    monkeypatch.delenv(ray_session.WORKER_LIMIT_ENV, raising=False)
    if user_value is None:
        monkeypatch.delenv(ray_session.PREEMPTION_WATCHER_ENV, raising=False)
    else:
        monkeypatch.setenv(ray_session.PREEMPTION_WATCHER_ENV, user_value)
    assert ray_session.init_ray() == calls[0]["address"]
    assert os.environ.get(ray_session.PREEMPTION_WATCHER_ENV) == expected
    # A local raylet keeps idle workers beyond its CPU count (the hosts hold none); a cluster's is its own.
    limit = str(len(os.sched_getaffinity(0)) + ray_session.ZERO_CPU_ACTORS) if ray_address == "local" else None
    assert os.environ.get(ray_session.WORKER_LIMIT_ENV) == limit


def test_a_local_rays_idle_worker_limit_counts_its_cpus_and_room_for_the_hosts_and_keeps_the_users(monkeypatch):
    assert ray_session.local_start_settings(2) == {ray_session.PREEMPTION_WATCHER_ENV: "0",
                                                   ray_session.WORKER_LIMIT_ENV: "10"}
    monkeypatch.setenv(ray_session.WORKER_LIMIT_ENV, "3")
    ray_session.local_start_env(64)
    assert os.environ[ray_session.WORKER_LIMIT_ENV] == "3"


def test_ray_train_polls_its_workers_often_for_small_groups_and_rarely_for_large_ones():
    from rayalign.train import poll_interval

    assert [poll_interval(n) for n in (1, 2, 16, 32, 64, 128, 512)] == [0.25, 0.25, 0.25, 0.5, 1.0, 2.0, 2.0]
