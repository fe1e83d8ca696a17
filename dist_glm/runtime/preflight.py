"""Preflight: before the long run, prove that the ranks can work together, or say per host why not.

The classic multi-node failure is a hang: one rank has the wrong head address, a port is firewalled,
a node mounted a different output directory, and the job sits in a collective until the scheduler
kills it hours later. Here every rank, before anything else:

1. reaches the head's rendezvous (MASTER_ADDR:MASTER_PORT, a TCP key-value store hosted by rank 0)
   within `preflight_timeout` seconds; rank 0 lists any rank that never arrived;
2. reads back a token rank 0 wrote into `output_dir`, proving that all ranks share one directory
   (checkpoints are written by every rank into it and read back by every rank on resume);
3. joins the process group and runs one all-reduce whose result is known in advance, bounded by the
   same timeout (the rendezvous can work while the ranks cannot reach each other's hosts).

Failures are UserErrors naming the rank, its host and the fix. The store built in step 1 becomes the
process group's store, so there is a single rendezvous.
"""

import json
import os
import secrets
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

from dist_glm.errors import EXIT_USER_ERROR, UserError

HOST = socket.gethostname()


def _who(rank: int) -> str:
    return f"rank {rank} ({HOST})"


def _is_local_address(addr: str) -> bool:
    """True when this host owns `addr`: binding to it succeeds only then."""
    try:
        infos = socket.getaddrinfo(addr, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return False
    for family, _, _, _, sockaddr in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((sockaddr[0], 0))
                return True
        except OSError:
            continue
    return False


def rendezvous(rank: int, world: int, timeout_s: int) -> torch.distributed.Store:
    """Connect to (rank 0: host) the store at MASTER_ADDR:MASTER_PORT and wait for every rank."""
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    head = f"MASTER_ADDR:MASTER_PORT={addr}:{port}"
    try:
        socket.getaddrinfo(addr, port)
    except socket.gaierror as e:
        raise UserError(
            f"{_who(rank)}: {head}: the address does not resolve here ({e.strerror}); set MASTER_ADDR to "
            "the head node's IP address (or a name every node resolves)",
            every_rank=True,
        ) from None
    if rank == 0 and not _is_local_address(addr):
        raise UserError(
            f"{_who(rank)}: {head} is not an address of this host, but rank 0 runs here and hosts the "
            "rendezvous; set MASTER_ADDR to this host's address (the launcher's head node)",
            every_rank=True,
        )
    deadline = time.monotonic() + timeout_s
    if rank != 0:
        _wait_until_reachable(rank, addr, port, head, deadline, timeout_s)
    try:
        store = torch.distributed.TCPStore(
            addr,
            port,
            world,
            is_master=rank == 0,
            timeout=timedelta(seconds=max(1.0, deadline - time.monotonic())),
            wait_for_workers=False,
        )
    except RuntimeError as e:
        cause = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        waited = timeout_s - max(0.0, deadline - time.monotonic())
        if rank == 0 and ("EADDRINUSE" in cause or "address already in use" in cause.lower()):
            raise UserError(
                f"{_who(rank)}: port {port} (MASTER_PORT) is already in use on this host, so the rendezvous cannot "
                f"start there; pick a free one: MASTER_PORT=<port> for srun/mpirun/torchrun, --master_port <port> "
                "for the deepspeed launcher (`make demo` picks a free one itself)",
                every_rank=True,
            ) from None
        fix = (
            "another job may hold the port; pick a free MASTER_PORT"
            if rank == 0
            else "check that MASTER_ADDR is the head node's address as seen from this host, that the port "
            "is open between the nodes, and that rank 0 started (see its log)"
        )
        raise UserError(
            f"{_who(rank)}: could not reach the rendezvous at {head} after {waited:.0f} s ({cause}); {fix}",
            every_rank=True,
        ) from None
    store.set(f"preflight/host/{rank}", HOST)
    if rank == 0:
        keys = [f"preflight/host/{r}" for r in range(world)]
        missing = _wait_keys(store, keys, timeout_s)
        if missing:
            ranks = ", ".join(k.rsplit("/", 1)[1] for k in missing)
            store.set("preflight/joined", json.dumps(f"ranks {ranks} did not join"))
            raise UserError(
                f"{_who(0)}: only {world - len(missing)} of {world} ranks reached the rendezvous at {head} "
                f"within {timeout_s} s; missing: rank {ranks}. Their own logs say why (a wrong MASTER_ADDR "
                "there, a firewall between the nodes, or they never started)"
            )
        store.set("preflight/joined", json.dumps(""))
    else:
        _wait_for(store, "preflight/joined", rank, timeout_s, "to see every rank join")
    return store


def check_shared_output_dir(store, rank: int, world: int, output_dir: str, timeout_s: int) -> None:
    """Every rank must see the file rank 0 writes into output_dir. Network filesystems may take a few
    seconds to show a new file on another node, so a rank retries for up to 30 s before it fails."""
    try:
        _check_shared_output_dir(store, rank, world, output_dir, timeout_s)
    except RuntimeError as e:  # the store went away: rank 0 stopped (its log says why)
        raise UserError(
            f"{_who(rank)}: lost the connection to rank 0 during the preflight ({str(e).strip()[:120]}); "
            "see rank 0's log",
            every_rank=True,
        ) from None


def _check_shared_output_dir(store, rank: int, world: int, output_dir: str, timeout_s: int) -> None:
    visible_within = min(30, timeout_s)
    # Rank 0 (and every rank, for the verdict) waits out the slowest rank's retries, plus a margin.
    verdict_within = timeout_s + visible_within + 5
    if rank == 0:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(8)
        probe = out / f".preflight-{token}"
        probe.write_text(token)
        store.set("preflight/token", json.dumps([token, str(out.resolve())]))
    else:
        token, rank0_path = json.loads(_wait_for(store, "preflight/token", rank, timeout_s, "to write its token"))
        probe = Path(output_dir) / f".preflight-{token}"
        deadline = time.monotonic() + visible_within
        while not _holds(probe, token) and time.monotonic() < deadline:
            time.sleep(0.5)
        problem = ""
        if not _holds(probe, token):
            here = Path(output_dir).resolve()
            problem = (
                f"{_who(rank)}: output_dir='{output_dir}' (here {here}) is not the directory rank 0 writes to "
                f"({rank0_path} on {store.get('preflight/host/0').decode()}); every rank must share it: use an "
                "absolute path on a filesystem all nodes mount"
            )
        store.set(f"preflight/dir/{rank}", problem)
    if rank == 0:
        missing = _wait_keys(store, [f"preflight/dir/{r}" for r in range(1, world)], verdict_within)
        probe.unlink(missing_ok=True)
        problems = [
            store.get(f"preflight/dir/{r}").decode() for r in range(1, world) if f"preflight/dir/{r}" not in missing
        ]
        problems = [p for p in problems if p] + [
            f"rank {k.rsplit('/', 1)[1]} did not report on output_dir" for k in missing
        ]
        store.set("preflight/dir_result", json.dumps(problems))
    else:
        problems = json.loads(_wait_for(store, "preflight/dir_result", rank, verdict_within, "to collect the checks"))
    if problems:
        raise UserError(problems)  # the same list on every rank; rank 0 prints it


def check_all_reduce(rank: int, world: int, device, timeout_s: int) -> None:
    """One all-reduce of known result, polled so that a broken link between hosts fails here, within
    the timeout, instead of inside the first training step."""
    t = torch.tensor([float(rank + 1)], device=device)
    work = torch.distributed.all_reduce(t, async_op=True)
    deadline = time.monotonic() + timeout_s
    while not work.is_completed():
        if time.monotonic() > deadline:
            # A collective still in flight cannot be cancelled, and tearing the group down would hang
            # on it: report and leave at once.
            print(
                f"train.py: error: {_who(rank)}: the test all-reduce across {world} ranks did not finish within "
                f"{timeout_s} s although every rank reached the rendezvous: the ranks cannot open connections "
                "to each other's hosts; set NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME to the interface between "
                "the nodes and check the firewall",
                file=sys.stderr,
                flush=True,
            )
            os._exit(EXIT_USER_ERROR)
        time.sleep(0.01)
    expected = world * (world + 1) / 2
    if float(t.item()) != expected:
        raise UserError(
            f"{_who(rank)}: the test all-reduce gave {float(t.item())} instead of {expected}: the ranks do not "
            "agree on the world size or rank numbering; check WORLD_SIZE and RANK from the launcher",
            every_rank=True,
        )


def _wait_until_reachable(rank: int, addr: str, port: int, head: str, deadline: float, timeout_s: int) -> None:
    """Plain TCP connects until rank 0's store answers: a clear error on timeout, where torch's own client
    would print a C++ stack trace for every retry."""
    while True:
        try:
            with socket.create_connection((addr, port), timeout=max(0.5, min(5.0, deadline - time.monotonic()))):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise UserError(
                    f"{_who(rank)}: could not reach the rendezvous at {head} within {timeout_s} s "
                    f"({e.strerror or e}); check that MASTER_ADDR is the head node's address as seen from this "
                    "host, that the port is open between the nodes, and that rank 0 started (see its log)",
                    every_rank=True,
                ) from None
            time.sleep(0.5)


def _holds(path: Path, token: str) -> bool:
    try:
        return path.read_text() == token
    except OSError:
        return False


def _wait_keys(store, keys: list[str], timeout_s: int) -> list[str]:
    """Poll until every key exists or the timeout passes; return the missing ones."""
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [k for k in keys if not store.check([k])]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.05)


def _wait_for(store, key: str, rank: int, timeout_s: int, what: str) -> str:
    try:
        store.wait([key], timedelta(seconds=timeout_s))
    except RuntimeError:
        raise UserError(
            f"{_who(rank)}: rank 0 did not finish the preflight ({what}) within {timeout_s} s; see rank 0's log",
            every_rank=True,
        ) from None
    value = store.get(key).decode()
    if key == "preflight/joined" and json.loads(value):
        raise UserError(f"{_who(rank)}: the job is incomplete: {json.loads(value)}; rank 0's log names them")
    return value
