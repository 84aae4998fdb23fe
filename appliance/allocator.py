"""The C allocator's share of the server's memory: arena cap and peak resident memory.

glibc's malloc gives a thread its own arena on its first allocation, until there are eight per
CPU, and an arena keeps its peak after the memory is freed. A gRPC server runs each call on a
worker thread of its own. Without a cap, every worker that once scored or generated a batch
would hold that batch's temporaries for the life of the process. For the default one-lead
model that was about 37 MiB per worker with the privacy search of 32,768 beats per block, and
about 20 MiB with 4,096. The server caps the arenas at one per engine slot plus the main one,
so that its memory no longer depends on how many worker threads have run a call.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import resource

logger = logging.getLogger(__name__)

# mallopt's parameter number for the arena limit, M_ARENA_MAX in glibc's <malloc.h>.
_M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas at ``arenas``, the main arena included.

    The cap applies to arenas created after the call, so call it before the threads that
    allocate start. Other C libraries are left as they are. Linux only: the module reads
    ``ru_maxrss`` in KiB.

    NOTE: glibc fixes its limit once a process has more than eight arenas; a cap set after
    that returns True but changes nothing. A fresh ``serve`` process has one arena here.

    Arguments:
        arenas: Arenas allowed, at least 1.

    Returns:
        Whether the cap is in force: False where the C library is not glibc or refuses it.
    """
    if arenas < 1:
        raise ValueError(f"arenas={arenas} must be at least 1")
    if platform.libc_ver()[0] != "glibc":
        logger.info("malloc arena cap skipped libc=%r", platform.libc_ver()[0] or "unknown")
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        return bool(libc.mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError) as exc:
        logger.info("malloc arena cap skipped reason=%r", str(exc))
        return False


def peak_resident_mib() -> float:
    """Return this process's peak resident memory in MiB (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
