"""What every certification shares, whatever its procedure (layer 2, no Lightning import): the ``certify`` group's
settings as one frozen, checked object, :class:`CertifyRun`. The procedure (with its own n0 / n / alpha) and the noise
are objects of their own."""

from __future__ import annotations

import dataclasses

from ssn_exp.certify.procedures import check_radii
from ssn_exp.certify.procedures_sequential import DEFAULT_RADII
from ssn_exp.exceptions import ConfigError, check_bool, check_positive_int, check_seed

__all__ = ["CertifyRun", "MAX_BATCH", "certify_indices"]

#: Upper bound of the batch sizes: within what torch indexes with int32/int64 arithmetic (the sample counts' is the
#: procedure's, :data:`ssn_exp.certify.procedures.MAX_SAMPLES`).
MAX_BATCH = 2**31 - 1
_AUTOCAST = (None, "none", "bf16", "fp16")


@dataclasses.dataclass(frozen=True)
class CertifyRun:
    """The settings of a certification (``certify.*``, plus the run's ``seed`` and ``trainer.precision``), each checked
    once, here (a :class:`ConfigError` naming the key): which examples (every ``skip``-th, at most ``max_examples``;
    job ``shard`` of ``num_shards``), how they are batched (``batch_size`` examples, ``noise_batch`` noisy inputs per
    forward pass), how the base classifier is run (``autocast``, ``channels_last``, ``compile``, ``precision``), the
    certification ``seed``, the ``radii`` metrics.json reports and whether ``progress`` is shown."""

    skip: int = 1
    max_examples: int | None = None
    noise_batch: int = 1024
    batch_size: int = 1
    seed: int = 0
    shard: int | None = None
    num_shards: int = 1
    autocast: str | None = None
    channels_last: bool = False
    compile: bool = False
    precision: str | None = None
    progress: bool = True
    radii: tuple[float, ...] = DEFAULT_RADII

    def __post_init__(self):
        def put(key, value):
            object.__setattr__(self, key, value)

        for key, maximum in (("skip", None), ("noise_batch", MAX_BATCH), ("batch_size", MAX_BATCH)):
            put(key, check_positive_int(getattr(self, key), f"certify.{key}", maximum=maximum))
        if self.max_examples is not None:
            put("max_examples", check_positive_int(self.max_examples, "certify.max_examples"))
        put("seed", check_seed(self.seed))
        put("num_shards", check_positive_int(self.num_shards, "certify.num_shards"))
        jobs = self.num_shards
        if jobs > 1 and self.shard is None:
            raise ConfigError(
                f"certify.num_shards={jobs} needs certify.shard=i (0..{jobs - 1}), one job per shard: "
                f"--multirun certify.shard=0,1,...,{jobs - 1}"
            )
        if self.shard is not None:  # one job of a certification split over jobs
            if jobs == 1:
                raise ConfigError(f"certify.shard={self.shard} needs certify.num_shards=N (the number of shard jobs)")
            put("shard", check_positive_int(self.shard, f"certify.shard (one of 0..{jobs - 1})", 0, jobs - 1))
        if not (self.autocast is None or (isinstance(self.autocast, str) and self.autocast in _AUTOCAST)):
            raise ConfigError(f"certify.autocast must be null, bf16 or fp16, got {self.autocast!r}")
        put("autocast", None if self.autocast == "none" else self.autocast)
        for key in ("channels_last", "compile", "progress"):
            check_bool(getattr(self, key), f"certify.{key}")
        if self.precision is not None and (
            isinstance(self.precision, bool) or not isinstance(self.precision, str | int)
        ):
            raise ConfigError(
                f"trainer.precision must be a string such as 32-true or bf16-mixed, got {self.precision!r}"
            )
        put("precision", None if self.precision is None else str(self.precision))
        try:
            put("radii", tuple(check_radii(self.radii, "certify.radii", allow_empty=False)))
        except ValueError as exc:  # (every certify.* refusal is a ConfigError)
            raise ConfigError(str(exc)) from None

    @property
    def lock_name(self) -> str:
        """The lock file of a job's run directory: a job shard locks its own shard (shards run side by side)."""
        return ".ssn_exp.lock" if self.num_shards == 1 else f".ssn_exp.shard{self.shard}of{self.num_shards}.lock"

    def indices(self, dataset_len: int) -> list[int]:
        """The test examples certified (all jobs')."""
        return certify_indices(dataset_len, self.skip, self.max_examples)


def certify_indices(dataset_len: int, skip: int = 1, max_examples: int | None = None) -> list[int]:
    """The test examples certified: every ``skip``-th, at most ``max_examples``."""
    indices = list(range(0, dataset_len, max(1, int(skip))))
    return indices if max_examples is None else indices[: int(max_examples)]
