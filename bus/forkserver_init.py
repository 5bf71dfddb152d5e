"""Imported only as the first preload of the supervisor's forkserver: it dies with the supervisor.

The forkserver is the parent of every forked replica, and each replica asks for the same
signal, so a SIGKILLed supervisor takes the forkserver and then every replica with it. A
supervisor that died before this import closed the forkserver's alive pipe, on which the
forkserver exits by itself.
"""

import os

from bus.parent_death import die_with_parent

FORKSERVER_PID = os.getpid()
"""Replicas fork from the forkserver after this import, so in them this is their parent's pid."""

die_with_parent(os.getppid())
