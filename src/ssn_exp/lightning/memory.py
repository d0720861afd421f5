"""How much memory certification's noisy batches need, and how much there is (no torch import at module level).

A noisy batch holds ``noise_batch`` inputs of C*H*W values. :data:`BYTES_PER_VALUE` bounds what certification
allocates per value at once: DSSN's int64 table indices (8 bytes), the noisy float32 inputs (4) and the model's
normalized copy of them (4); uniform noise and SSN need less. The model's own activations come on top, so a batch
that passes this check can still be too large for a big model; one that fails it cannot work.
"""

from __future__ import annotations

import os

from ssn_exp.exceptions import UserError

__all__ = ["BYTES_PER_VALUE", "MemoryLimitError", "noise_batch_bytes", "host_memory", "check_noise_batch"]

BYTES_PER_VALUE = 16


class MemoryLimitError(UserError, ValueError):
    """A certification batch that cannot fit in memory (the message names ``certify.noise_batch``)."""


def noise_batch_bytes(noise_batch: int, shape) -> int:
    """Bytes one noisy batch needs at least (Python integers: no overflow, however large the values)."""
    numel = 1
    for s in shape:
        numel *= int(s)
    return int(noise_batch) * numel * BYTES_PER_VALUE


def host_memory(available: bool = True) -> int | None:
    """Bytes of memory available now (MemAvailable) or in total (physical memory) on this host; None if unknown."""
    if available:
        try:
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES" if available else "SC_PHYS_PAGES")
        return int(pages) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_noise_batch(noise_batch: int, shape, limit: int | None, where: str, asked: int | None = None) -> None:
    """Refuse a batch of ``noise_batch`` noisy ``shape`` inputs that needs more than ``limit`` bytes (``where``: what
    the limit is, e.g. "this host's memory"); ``asked``: the certify.noise_batch setting if the batch is smaller.
    ``limit=None`` (unknown) checks nothing."""
    need = noise_batch_bytes(noise_batch, shape)
    asked = noise_batch if asked is None else asked
    if limit is None or need <= limit:
        return
    numel = noise_batch_bytes(1, shape) // BYTES_PER_VALUE
    fits = max(1, limit // (numel * BYTES_PER_VALUE))
    raise MemoryLimitError(
        f"certify.noise_batch={asked} needs at least {_gib(need)} for one batch of noisy "
        f"{list(int(s) for s in shape)} inputs, more than {where} ({_gib(limit)}); "
        f"set certify.noise_batch={min(fits, max(1, noise_batch - 1))} or less"
    )
