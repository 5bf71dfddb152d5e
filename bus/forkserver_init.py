"""Imported only as the first preload of the supervisor's forkserver: it dies with the supervisor.

The forkserver is the parent of every forked replica, and each replica asks for the same
signal, so a SIGKILLed supervisor takes the forkserver and then every replica with it.
"""

from bus.parent_death import die_with_parent

die_with_parent()
