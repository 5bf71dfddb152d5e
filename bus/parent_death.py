"""Linux's parent-death signal: a child process asks to be sent SIGTERM when its parent dies."""

from __future__ import annotations

import ctypes
import functools
import os
import signal
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Ask for SIGTERM when the parent dies. `parent_pid` is the parent as it was before the
    fork: if the parent has already died, this process now belongs to init or to a subreaper,
    and it ends at once. Comparing with the parent's own pid, not with 1, is what lets a parent
    that is itself pid 1 (`bitnexus up` as a container's entrypoint) keep its children."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before we asked: act as if the signal came
        os.kill(os.getpid(), signal.SIGTERM)


def dies_with_this_process() -> Callable[[], None]:
    """A `preexec_fn` for a child that dies with the process starting it: this process's pid,
    taken now, before the fork."""
    return functools.partial(die_with_parent, os.getpid())
