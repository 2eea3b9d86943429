"""Several processes, one generation: tensor-parallel transformer (tensor.py), seeds split over ranks
(data.py), over MLX's own engine (`mx.distributed`) and launcher (`mlx.launch`).

A plain run never touches the engine: `world()` returns a group only when a launcher started this
process (its environment names a rank) and the group has more than one process.
"""

from __future__ import annotations

import math
import os
import sys

import mlx.core as mx

# Variables the launchers set in every process they start (mlx.launch: ring, jaccl, nccl; mpirun).
LAUNCHER_VARIABLES = ("MLX_RANK", "MLX_HOSTFILE", "MLX_JACCL_COORDINATOR", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
DEFAULT_TIMEOUT = 600.0  # seconds a rank waits for the others (connection, a denoising step) before it stops


class ParallelError(ValueError):
    """A distributed run that cannot start or go on (no launcher, a rank gone, a bad split)."""


def launched() -> bool:
    """Whether a launcher started this process (it set one of the rank variables)."""
    return any(os.environ.get(name) for name in LAUNCHER_VARIABLES)


def world() -> mx.distributed.Group | None:
    """The group of all launched processes, or None in a plain run or a group of one.

    Without a launcher nothing is initialised (no backend is even looked for)."""
    if not launched():
        return None
    try:
        group = mx.distributed.init(strict=True)
    except RuntimeError as e:
        raise ParallelError(f"cannot join the distributed group ({e}): a rank cannot connect, or the "
                            "hosts file is wrong") from None
    return group if group.size() > 1 else None


def is_main(group: mx.distributed.Group | None) -> bool:
    """Rank 0 (or a plain run): the process that prints progress and writes files."""
    return group is None or group.rank() == 0


# The watchdog's own process: a thread would not do, as MLX holds the GIL while it waits in a collective
# or in joining the group. It reads "SECONDS<TAB>WHO<TAB>STAGE" lines (SECONDS may be inf) and, past the
# deadline, prints the message and kills the watched process. It ends when the pipe closes.
_WATCHER = r"""
import os, select, signal, sys, time
pid, deadline, who, stage, limit, pending = int(sys.argv[1]), float("inf"), "", "", "", b""
while True:
    ready, _, _ = select.select([0], [], [], max(0.0, min(1.0, deadline - time.monotonic())))
    if ready:
        data = os.read(0, 65536)
        if not data:
            sys.exit(0)
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:  # the last complete line wins
            seconds, who, stage = line.decode().split("\t", 2)
            deadline, limit = time.monotonic() + float(seconds), seconds
    elif time.monotonic() > deadline:
        print(f"error: {who}: no answer from the other ranks for {limit} s while {stage} (a rank died or "
              "cannot connect); stopping, no image written", file=sys.stderr, flush=True)
        os.kill(pid, signal.SIGKILL)
        sys.exit(1)
"""


class Watchdog:
    """Ends this process with a one-line message when the other ranks stop answering.

    A collective (`all_sum`, joining the group) waits for every rank: if one hangs or never connects,
    the others would wait for ever (a rank that dies is seen at once: the ring backend raises). `kick()`
    arms a deadline `timeout` seconds away (joining, each denoising step); `pause()` disarms it while
    this rank works alone (loading, encoding, decoding). Past the deadline a small watcher process prints
    the message on stderr and kills this one (SIGKILL: it may be blocked inside MLX). Nothing is
    written then: images are only published, atomically, after the last collective.
    """

    def __init__(self, rank: int, size: int = 0, timeout: float = DEFAULT_TIMEOUT):
        import subprocess

        self.rank, self.size, self.timeout = rank, size, float(timeout)
        self._watcher = subprocess.Popen([sys.executable, "-c", _WATCHER, str(os.getpid())],
                                         stdin=subprocess.PIPE, text=True)
        self.kick("joining the group")

    def _send(self, seconds: float, stage: str) -> None:
        who = f"rank {self.rank} of {self.size}" if self.size else f"rank {self.rank}"
        try:
            self._watcher.stdin.write(f"{seconds:g}\t{who}\t{stage}\n")
            self._watcher.stdin.flush()
        except (BrokenPipeError, ValueError):  # the watcher is gone (stopped): nothing to tell
            pass

    def kick(self, stage: str) -> None:
        """Progress: the other ranks have `timeout` seconds from now to answer while `stage`."""
        self._send(self.timeout, stage)

    def pause(self) -> None:
        """This rank works alone (loading, encoding, decoding): no deadline until the next kick."""
        self._send(math.inf, "working")

    def stop(self) -> None:
        if self._watcher.stdin and not self._watcher.stdin.closed:
            self._watcher.stdin.close()
        self._watcher.wait()


def from_main(arrays: list[mx.array], group: mx.distributed.Group) -> list[mx.array]:
    """Rank 0's arrays on every rank (a sum where the other ranks give zeros: exact), so every rank's
    share of a sharded model sees the very same inputs even if the ranks' own text encoders or noise
    differed in the last bit (different chips)."""
    rank = group.rank()
    return [mx.distributed.all_sum(a if rank == 0 else mx.zeros_like(a), group=group) for a in arrays]
