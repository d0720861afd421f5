"""Sequential certification of a stream of examples (docs/method.md section 13.5): each example stops sampling as
soon as its :class:`~ssn_exp.certify.sequential_bounds.SequentialTest` decides, and the next example of the stream
takes its place.

Plain numpy + torch: no Lightning, no Hydra, no I/O. :class:`PackingScheduler` packs the next samples of many
examples into forward passes of at most ``noise_batch`` inputs, for any model callable; :class:`SequentialStream`
keeps a fixed number of examples in flight, replacing each as soon as it finishes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ssn_exp.certify.core import NonFiniteLogitsError, check_logits, top_class
from ssn_exp.certify.sequential_bounds import SequentialTest

__all__ = ["PackingScheduler", "SequentialExample", "SequentialStream"]


class PackingScheduler:
    """Packs per-image sample requests into forward passes of at most ``noise_batch`` samples (bookkeeping only).

    ``add(image, n)`` queues a request; ``next_forward()`` returns a list of ``(image, count)`` pieces taken from
    the queue in order (a request may be split over several forward passes), or an empty list when nothing is
    queued. ``finished`` lists the requests completed by the last forward pass.
    """

    def __init__(self, noise_batch: int):
        if isinstance(noise_batch, bool) or not isinstance(noise_batch, int | np.integer) or noise_batch < 1:
            raise ValueError(f"noise_batch must be an integer >= 1, got {noise_batch!r}")
        self.noise_batch = int(noise_batch)
        self._queue: deque[list[int]] = deque()  # [image, remaining, total]
        self._queued: set[int] = set()
        self.finished: list[tuple[int, int]] = []

    def add(self, image: int, n: int) -> None:
        if n < 1:
            raise ValueError(f"a request needs at least one sample, got {n}")
        if image in self._queued:
            raise ValueError(f"image {image} already has a request queued")
        self._queue.append([int(image), int(n), int(n)])
        self._queued.add(int(image))

    def __len__(self) -> int:
        return len(self._queue)

    def next_forward(self) -> list[tuple[int, int]]:
        pieces, room = [], self.noise_batch
        self.finished = []
        while room and self._queue:
            req = self._queue[0]
            take = min(room, req[1])
            pieces.append((req[0], take))
            req[1] -= take
            room -= take
            if req[1] == 0:
                self._queue.popleft()
                self._queued.discard(req[0])
                self.finished.append((req[0], req[2]))
        return pieces


@dataclass
class SequentialExample:
    """One example's result from :class:`SequentialStream` (as :class:`SequentialCertificates`, for one example)."""

    key: object  # the key the example was given with
    prediction: int
    p_lower: float
    p_upper: float
    successes: int
    samples: int
    counts: np.ndarray  # int64 (classes,)
    counts_n0: np.ndarray | None  # int64 (classes,); None with labels


class SequentialStream:
    """Certify a stream of examples sequentially, ``capacity`` of them in flight at once, packing the next samples
    of every example in flight into forward passes of at most ``noise_batch`` inputs.

    :meth:`run` takes an iterable of ``(key, shape, noise_fn, label)``: ``noise_fn(n)`` returns n fresh noisy
    copies of the example, shape (n, *shape); ``label`` is tested directly when ``use_labels`` (else ignored).
    It yields, after every forward pass that finishes some examples, the list of their
    :class:`SequentialExample` in the order they finished, and takes the next examples of the stream into the
    freed places, so forward passes stay full until the stream runs dry. ``noise_fn`` is called once per batch of
    the schedule (and once for the n0 selection samples), in the same order for an example whatever ``capacity``,
    ``noise_batch`` or the other examples are, so per-example generators make each result independent of the
    packing. Selection: class A is the most frequent of n0 fresh samples (ties: lowest index). ``dtype``: the dtype
    the model's inputs are cast to (None: as ``noise_fn`` gives them).
    """

    def __init__(
        self,
        model: Callable[[torch.Tensor], torch.Tensor],
        num_classes: int,
        test: SequentialTest,
        *,
        n0: int,
        use_labels: bool,
        noise_batch: int,
        capacity: int,
        dtype: torch.dtype | None = None,
    ):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not use_labels and (isinstance(n0, bool) or not isinstance(n0, int) or n0 < 1):
            raise ValueError(f"n0 must be an integer >= 1 (or give labels), got {n0!r}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        self.model, self.num_classes, self.test = model, num_classes, test
        self.n0, self.use_labels, self.capacity, self.dtype = n0, use_labels, capacity, dtype
        self.sched = PackingScheduler(noise_batch)
        self.forward_batches = 0  # forward passes of the model (calls) so far

    def run(self, examples) -> Iterator[list[SequentialExample]]:
        test, sched = self.test, self.sched
        state = test.start(self.capacity)  # the test's counts, one place ("slot") per example in flight
        flying: dict[int, _InFlight] = {}
        free = deque(range(self.capacity))
        feed = iter(examples)

        def request(s: int) -> int:  # the size of the example's next request: its selection, or its next batch
            return self.n0 if flying[s].selecting else int(test.next_batch(state, [s])[0])

        def take() -> None:  # the next examples of the stream into the free slots
            while free and (example := next(feed, None)) is not None:
                key, shape, noise_fn, label = example
                s = free.popleft()
                state.reset(s)
                flying[s] = _InFlight(key, tuple(shape), noise_fn, self.num_classes)
                if self.use_labels:  # the label is tested directly: no selection
                    flying[s].test_class(self._label(label, key))
                sched.add(s, request(s))

        take()
        with torch.inference_mode():
            while len(sched):
                pieces = sched.next_forward()
                for s, _ in pieces:
                    if flying[s].copies is None:  # a request starts: its copies are drawn in one call
                        flying[s].draw(request(s))
                batch = torch.cat([flying[s].next_copies(m) for s, m in pieces])
                votes = self._forward(batch, [(flying[s].key, m) for s, m in pieces])
                for (s, _), v in zip(pieces, votes):  # (one vote array per piece)
                    flying[s].count(v)
                finished = [s for s, _ in sched.finished]
                selected = [s for s in finished if flying[s].selecting]
                tested = np.asarray([s for s in finished if not flying[s].selecting], dtype=np.int64)
                for s in selected:  # class A: the most frequent of the n0 selection samples (ties: lowest index)
                    flying[s].test_class(int(top_class(flying[s].counts_n0[None])[0]))
                done = np.zeros(0, dtype=bool)
                if len(tested):
                    done = test.update(state, tested, [flying[s].end_request() for s in tested])
                for s in [*tested[~done], *selected]:  # the next request of every example that goes on
                    sched.add(int(s), request(int(s)))
                stopped = [int(s) for s in tested[done]]
                if stopped:
                    results = [flying.pop(s).result(state, s, self.use_labels) for s in stopped]
                    free.extend(stopped)
                    yield results
                    take()

    def _label(self, label, key) -> int:
        if isinstance(label, bool) or not isinstance(label, int | np.integer) or not 0 <= label < self.num_classes:
            raise ValueError(f"labels must be integers in [0, {self.num_classes}), got {label!r} for example {key!r}")
        return int(label)

    def _forward(self, batch: torch.Tensor, pieces: list[tuple[object, int]]) -> list[np.ndarray]:
        """The predicted classes of one forward pass, split into the pieces ``(example key, copies)``."""
        logits = self.model(batch if self.dtype is None else batch.to(self.dtype))
        self.forward_batches += 1
        finite = check_logits(logits, len(batch), self.num_classes).cpu().numpy()
        out = logits.argmax(dim=1).cpu().numpy()
        votes, pos = [], 0
        for key, m in pieces:
            if not finite[pos : pos + m].all():
                raise NonFiniteLogitsError(
                    f"the model returned NaN or infinite logits for example {key!r}: no certificate is computed",
                    positions=[key],
                )
            votes.append(out[pos : pos + m])
            pos += m
        return votes


class _InFlight:
    """An example in flight: its noise, the class under test, and its votes so far (selection and test apart)."""

    def __init__(self, key, shape: tuple, noise_fn: Callable, num_classes: int):
        self.key, self.shape, self.noise_fn, self.num_classes = key, shape, noise_fn, num_classes
        self.prediction: int | None = None  # the class under test (after the selection, or the label)
        self.samples = 0  # forward passes spent on it
        self.counts = np.zeros(num_classes, dtype=np.int64)  # the test's votes (selection samples excluded)
        self.counts_n0 = np.zeros(num_classes, dtype=np.int64)
        self.got = 0  # successes so far in the current request
        self.copies: torch.Tensor | None = None  # the noisy copies of the current request (``used``: how many used)

    @property
    def selecting(self) -> bool:
        """Whether it is drawing its n0 selection samples (no class under test yet)."""
        return self.prediction is None

    def test_class(self, c: int) -> None:
        self.prediction = c

    def draw(self, size: int) -> None:
        """The noisy copies of the next request (``size`` of them, one call of the example's ``noise_fn``)."""
        self.copies, self.used = self.noise_fn(size), 0
        if tuple(self.copies.shape) != (size, *self.shape):
            raise ValueError(
                f"noise_fn of example {self.key!r} returned shape {tuple(self.copies.shape)} for {size} "
                f"copies; expected {(size, *self.shape)}"
            )

    def next_copies(self, m: int) -> torch.Tensor:
        self.used += m
        return self.copies[self.used - m : self.used]

    def count(self, predicted: np.ndarray) -> None:
        self.samples += len(predicted)
        votes = np.bincount(predicted, minlength=self.num_classes)
        if self.selecting:
            self.counts_n0 += votes
        else:
            self.counts += votes
            self.got += int(votes[self.prediction])
        if self.used == len(self.copies):
            self.copies = None

    def end_request(self) -> int:
        """The successes of the request that just finished (the test's next update)."""
        got, self.got = self.got, 0
        return got

    def result(self, state, s: int, use_labels: bool) -> SequentialExample:
        return SequentialExample(
            key=self.key,
            prediction=self.prediction,
            p_lower=float(state.lower[s]),
            p_upper=float(state.upper[s]),
            successes=int(state.successes[s]),
            samples=self.samples,
            counts=self.counts,
            counts_n0=None if use_labels else self.counts_n0,
        )
