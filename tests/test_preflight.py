"""The start-up preflight turns the classic multi-node hangs into one clear error per host, within
`preflight_timeout`: a head address that is wrong or unreachable, a rank that never starts, an
output_dir that is not shared. Ranks are started the way srun or torchrun start them: separate
processes with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in their environment."""

import subprocess
import sys
import time

import pytest

from conftest import REPO, _free_port, base_args, child_env

TIMEOUT = 8

pytestmark = pytest.mark.slow  # every test here starts processes


def start_rank(rank: int, world: int, addr: str, port: int, args: list[str], cwd=REPO) -> subprocess.Popen:
    env = dict(child_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    env.update(MASTER_ADDR=addr, MASTER_PORT=str(port))
    return subprocess.Popen(
        [sys.executable, str(REPO / "launch" / "train.py"), *args, f"--preflight_timeout={TIMEOUT}"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=180)
    errors = [line for line in err.splitlines() if line.startswith("train.py: error:")]
    return proc.returncode, "\n".join(errors) or err[-3000:]


def test_unreachable_head_fails_within_the_timeout(tmp_path, varlen_data):
    t0 = time.monotonic()
    port = _free_port()  # nothing listens there: rank 0 never started
    rc, err = finish(start_rank(1, 2, "127.0.0.1", port, base_args(tmp_path / "o", varlen_data)))
    assert rc == 2, err
    assert "rank 1 (" in err and f"could not reach the rendezvous at MASTER_ADDR:MASTER_PORT=127.0.0.1:{port}" in err
    assert f"within {TIMEOUT} s (Connection refused)" in err and "Traceback" not in err
    assert time.monotonic() - t0 < TIMEOUT + 60  # start-up + the timeout, not a hang


def test_head_address_that_is_not_this_host_is_refused_on_rank0(tmp_path, varlen_data):
    rc, err = finish(start_rank(0, 2, "192.0.2.1", _free_port(), base_args(tmp_path / "o", varlen_data)))
    assert rc == 2 and "rank 0 (" in err and "192.0.2.1" in err and "is not an address of this host" in err, err


def test_unresolvable_head_name(tmp_path, varlen_data):
    rc, err = finish(start_rank(1, 2, "no-such-head.invalid", _free_port(), base_args(tmp_path / "o", varlen_data)))
    assert rc == 2 and "no-such-head.invalid" in err and "does not resolve here" in err, err


def test_rank_that_never_joins_is_named(tmp_path, varlen_data):
    rc, err = finish(start_rank(0, 3, "127.0.0.1", _free_port(), base_args(tmp_path / "o", varlen_data)))
    assert rc == 2, err
    assert "only 1 of 3 ranks reached the rendezvous" in err and "missing: rank 1, 2" in err, err


def test_output_dir_not_shared_is_reported_per_host(tmp_path, varlen_data):
    # Two "nodes" that resolve the relative output_dir differently (each starts in its own directory),
    # the single-host picture of nodes that do not mount the same filesystem.
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for d in nodes:
        d.mkdir()
    port = _free_port()
    args = base_args("out", varlen_data, max_steps=2)
    procs = [start_rank(r, 2, "127.0.0.1", port, args, cwd=nodes[r]) for r in range(2)]
    (rc0, err0), (rc1, _) = finish(procs[0]), finish(procs[1])
    assert rc0 == 2 and rc1 == 2, err0
    assert "rank 1 (" in err0 and f"output_dir='out' (here {nodes[1] / 'out'})" in err0, err0
    assert f"is not the directory rank 0 writes to ({nodes[0] / 'out'}" in err0, err0
    assert not list((nodes[0] / "out").glob(".preflight-*")), "the probe file is cleaned up"
