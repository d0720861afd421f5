"""Throughput benchmark of the certification path: ``python -m ssn_exp.bench`` (``make bench``).

For each model and each certificate (DSSN, randomized uniform noise from n0 + n samples, and uniform noise
certified sequentially), three ways of doing the same number of base-classifier forward passes are timed side
by side in one process, interleaved, ``--repeats`` times (medians are reported):

- ``cert``     -- the library: :func:`ssn_exp.certify.certify_batch` (noise made on the device,
  DSSN from its integer table, counts by ``bincount``);
- ``forward``  -- the limit: plain batched forward passes of the same model on random inputs of
  the same shape, in the same batch sizes, under ``torch.inference_mode``, argmax included;
- ``baseline`` -- the straightforward way of the published code: every noisy sample of one image
  is materialised (DSSN: the L copies built with the float split formula; randomized: ``torch.rand``
  per batch), forwarded in batches and counted with ``F.one_hot(pred, C).sum(0)``.

A sequential certificate spends a data-dependent number of forward passes per image (``samples``), packing the
samples of many images into forward passes of ``noise_batch``. Its forward passes are counted in a warm-up run
(every run of it draws the same noise: a generator per image, seeded alike each run); ``forward`` then does that
many plain forward passes in batches of ``noise_batch``, and ``baseline`` certifies the images one at a time with
the same procedure and noise (the same forward passes, unpacked). The line printed below the table gives its
forward passes per second as a ratio of plain batched forward passes of the same model (the target is at
least 0.90) and the forward passes it spent per image.

Throughput is forward passes per second; the ratios cert/forward and cert/baseline are reported
per model. ``train_noise_overhead`` is the extra time noise sampling (``smoothing.sample``) adds to
a training step (forward + backward + SGD step, batch 64): the time of ``sample`` on the batch
divided by the time of the step without noise (both medians of interleaved repeats). The direct
measurement, step with noise / step without - 1, is in ``raw`` too; it is the same quantity but
much noisier on a shared CPU.

``--json FILE`` writes the ratios, the raw numbers, the device, torch version and thread count.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ssn_exp.atomic import replace_file
from ssn_exp.certify.core import Certificates, forward_chunks
from ssn_exp.certify.procedures import Exact, FixedSample, Procedure
from ssn_exp.certify.procedures_sequential import Sequential
from ssn_exp.certify.record import SAMPLES_COLUMN
from ssn_exp.models import DigitsCNN, WideResNet, normalized
from ssn_exp.noises import DSSN, SSN, Noise, Uniform

__all__ = ["ModelCase", "CASES", "CertCase", "cert_cases", "sequential_cases", "train_noises", "run_bench", "main"]


@dataclass(frozen=True)
class ModelCase:
    """One benchmarked model: its input shape, q, and the sizes used per device."""

    name: str
    net: Callable[[], torch.nn.Module]  # the network (before normalisation)
    data: str  # conf/data/<data>.yaml: the normalisation constants
    shape: tuple[int, int, int]
    q: int
    num_classes: int = 10
    dssn_sigma: float = 0.5
    rand_sigma: float = 0.5
    # per device ("cpu", "cuda"): images certified per repeat, noise_batch, randomized n0 and n (the sequential
    # certificate's cap), images certified from n0 + n samples and sequentially
    sizes: dict = field(default_factory=dict)
    quick_sizes: dict = field(default_factory=dict)
    cuda_only: bool = False


def _resnet50() -> torch.nn.Module:
    from torchvision.models import resnet50

    return resnet50(weights=None, num_classes=1000)


def _normalisation(data: str) -> tuple[list[float], list[float]]:
    """mean and std of a data set, read from its config (one source of truth)."""
    from omegaconf import OmegaConf

    from ssn_exp.cli.config import CONF_DIR

    cfg = OmegaConf.load(Path(CONF_DIR) / "data" / f"{data}.yaml")
    return list(cfg.mean), list(cfg.std)


CASES: dict[str, ModelCase] = {
    "digits_cnn": ModelCase(
        "digits_cnn",
        lambda: DigitsCNN(num_classes=10, in_channels=1, width=16, image_size=8),
        "digits",
        (1, 8, 8),
        q=16,
        # L = 27 offsets: 37 images per chunk of noise_batch 1024 (999 inputs)
        sizes={
            "cpu": dict(images=740, noise_batch=1024, n0=64, n=2048, rand_images=16, seq_images=64),
            "cuda": dict(images=7400, noise_batch=4096, n0=64, n=8192, rand_images=64, seq_images=512),
        },
        quick_sizes=dict(images=74, noise_batch=1024, n0=64, n=1024, rand_images=2, seq_images=4, seq_n=128),
    ),
    "wrn40_2": ModelCase(
        "wrn40_2",
        lambda: WideResNet(40, 2, num_classes=10, in_channels=3),
        "cifar10",
        (3, 32, 32),
        q=255,
        # L = 441 offsets. On a CPU small batches are faster per image (cache), so 3 chunks of 147.
        sizes={
            "cpu": dict(images=1, noise_batch=147, n0=64, n=441, rand_images=1, seq_images=2),
            "cuda": dict(images=36, noise_batch=4096, n0=64, n=8192, rand_images=4, seq_images=32),
        },
        quick_sizes=dict(images=1, noise_batch=147, n0=16, n=147, rand_images=1, seq_images=1),
    ),
    "resnet50": ModelCase(
        "resnet50",
        _resnet50,
        "imagenet",
        (3, 224, 224),
        q=255,
        num_classes=1000,
        sizes={"cuda": dict(images=8, noise_batch=2048, n0=64, n=4096, rand_images=1, seq_images=8)},
        quick_sizes=dict(images=1, noise_batch=441, n0=64, n=441, rand_images=1, seq_images=1),
        cuda_only=True,
    ),
}

VARIANTS = ("cert", "forward", "baseline")
#: Images in flight in the sequential case: certify.batch_size's default (conf/certify/default.yaml), as a run has.
SEQ_IN_FLIGHT = 16


@dataclass(frozen=True)
class CertCase:
    """One benchmarked certificate: a noise certified by a procedure, beside the published code's way of doing the
    same forward passes (``baseline(model, x, case, num_classes, noise_batch, generator) -> counts``)."""

    key: str  # the case's name in the results: "<key>_vs_forward", raw["certification"][key]
    row: str  # its label in the printed table
    noise: Noise
    procedure: Procedure
    baseline: Callable
    # noisy copies per image in each counting round (as the procedure makes them); () when the procedure decides
    # per image how many it needs (counted in a warm-up run, then done in plain batches of noise_batch)
    rounds: tuple[int, ...]
    images: int  # images certified per repeat
    info: dict  # what else the results record about the case
    # the generator(s) of one run, made afresh for each run: (device, images) -> a generator or one per image
    generator: Callable = field(default=lambda device, images: torch.Generator(device=device).manual_seed(0))
    # images handed to the procedure per batch, as the driver does (certify.batch_size); None: all in one batch
    batch_size: int | None = None


def _per_image_generators(device, images: int) -> list[torch.Generator]:
    """One generator per image, seeded alike in every run: each run of a case draws the same noise per image,
    however the images are packed into forward passes (so a sequential test spends the same passes each time)."""
    return [torch.Generator(device=device).manual_seed(i) for i in range(images)]


# ---------------------------------------------------------------------------------------- helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _quantized_images(n: int, shape, q: int, device, generator) -> torch.Tensor:
    k = torch.randint(0, q + 1, (n, *shape), generator=generator, device="cpu")
    return (k.float() / q).to(device)


def _chunk_sizes(images: int, n: int, noise_batch: int) -> list[int]:
    """The batch sizes of the forward passes count_predictions makes for ``images`` x ``n``."""
    return [(i1 - i0) * (stop - start) for i0, i1, start, stop in forward_chunks(images, n, noise_batch)]


# ---------------------------------------------------------------------------------------- the three ways
def _forward_limit(model, sizes: list[int], buf: torch.Tensor) -> int:
    """Plain forward passes in the given batch sizes (random inputs), argmax included."""
    done = 0
    with torch.inference_mode():
        for b in sizes:
            pred = model(buf[:b]).argmax(dim=1)
            done += pred.numel()
        _ = pred.sum().item()  # one sync at the end, as the certificate's .cpu() does
    return done


def _baseline_dssn(model, x: torch.Tensor, case: CertCase, num_classes: int, noise_batch: int, generator):
    """The published code's way: per image, build all L noisy copies with the float formula, one-hot counts."""
    noise = case.noise
    L, q = noise.levels, noise.q
    w = L / q
    v = noise.v.to(x.device)
    out = []
    with torch.inference_mode():
        for img in x:
            flat = img.reshape(1, -1).repeat(L, 1)  # (L, d)
            j = torch.arange(L, device=x.device).unsqueeze(1)
            s = (torch.remainder(v.unsqueeze(0) + j, L).float() + 0.5) / q
            c = w * torch.ceil((flat - s) / w) + s
            noisy = (torch.clamp(c, max=1.0) + torch.clamp(c - w, min=0.0)) / 2
            noisy = noisy.view(L, *img.shape)
            counts = torch.zeros(num_classes, dtype=torch.long, device=x.device)
            for start in range(0, L, noise_batch):
                pred = model(noisy[start : start + noise_batch]).argmax(dim=1)
                counts += F.one_hot(pred, num_classes).sum(0)
            out.append(counts)
    return torch.stack(out).cpu()


def _baseline_uniform(model, x, case: CertCase, num_classes: int, noise_batch: int, generator):
    """Cohen et al. / Yang et al.: per image, torch.rand noise per batch, one-hot counts (n0 then n)."""
    lam = case.noise.lam
    out = []
    with torch.inference_mode():
        for img in x:
            for total in case.rounds:
                counts = torch.zeros(num_classes, dtype=torch.long, device=x.device)
                remaining = total
                while remaining > 0:
                    b = min(noise_batch, remaining)
                    remaining -= b
                    batch = img.unsqueeze(0).repeat(b, 1, 1, 1)
                    eps = (torch.rand(batch.shape, device=x.device, generator=generator) * 2 - 1) * lam
                    pred = model(batch + eps).argmax(dim=1)
                    counts += F.one_hot(pred, num_classes).sum(0)
                out.append(counts)
    return torch.stack(out).cpu()


def _baseline_one_at_a_time(model, x, case: CertCase, num_classes: int, noise_batch: int, generator):
    """The case's own procedure, one image at a time (no packing of images into a forward pass), from the same
    per-image generators: the same noise and forward passes as the packed run."""
    out = [
        case.procedure.certify(model, x[j : j + 1], case.noise, num_classes, noise_batch=noise_batch, generator=[g])
        for j, g in enumerate(generator)
    ]
    return torch.from_numpy(np.concatenate([c.counts for c in out]))


# ---------------------------------------------------------------------------------------- runners
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def cert_cases(case: ModelCase, sz: dict) -> list[CertCase]:
    """The certificates benchmarked on one model, built once: DSSN enumerated exactly, and randomized uniform
    noise certified from n0 + n samples; each beside its published baseline."""
    dssn = DSSN(case.dssn_sigma, q=case.q, dim=math.prod(case.shape), seed=0)
    uni = Uniform(case.rand_sigma)
    n0, n = sz["n0"], sz["n"]
    return [
        CertCase(
            key=dssn.name,
            row=f"{dssn.name} L={dssn.levels}",
            noise=dssn,
            procedure=Exact(),
            baseline=_baseline_dssn,
            rounds=(dssn.support,),
            images=sz["images"],
            info={"levels": dssn.levels, "sigma": case.dssn_sigma},
        ),
        CertCase(
            key="randomized",
            row=uni.name,
            noise=uni,
            procedure=FixedSample(n0=n0, n=n),
            baseline=_baseline_uniform,
            rounds=(n0, n),
            images=sz["rand_images"],
            info={"n0": n0, "n": n, "noise": uni.name, "sigma": case.rand_sigma},
        ),
    ]


def sequential_cases(case: ModelCase, sz: dict) -> list[CertCase]:
    """The certificates whose forward passes per image the procedure decides as it goes: uniform noise certified
    sequentially (n0 selection samples, the cap n of the fixed case unless ``seq_n`` is given, the procedure's
    default radii; certify.batch_size's default of images in flight), beside the same procedure run one image at a
    time."""
    uni = Uniform(case.rand_sigma)
    n = sz.get("seq_n", sz["n"])  # the cap: the fixed case's n unless the sizes give another (--quick: smaller)
    seq = Sequential(n0=sz["n0"], n=n)
    return [
        CertCase(
            key=seq.name,
            row=f"{uni.name} {seq.name}",
            noise=uni,
            procedure=seq,
            baseline=_baseline_one_at_a_time,
            rounds=(),
            images=sz["seq_images"],
            info={
                "n0": sz["n0"],
                "n": n,
                "noise": uni.name,
                "sigma": case.rand_sigma,
                "procedure": seq.name,
                "in_flight": SEQ_IN_FLIGHT,
            },
            generator=_per_image_generators,
            batch_size=SEQ_IN_FLIGHT,
        )
    ]


def train_noises(case: ModelCase) -> list[Noise]:
    """The noises whose sampling cost in a training step is measured on one model."""
    d = math.prod(case.shape)
    return [Uniform(case.rand_sigma), SSN(case.rand_sigma), DSSN(case.dssn_sigma, q=case.q, dim=d, seed=0)]


def _record_batches(model) -> tuple[list[int], Callable[[], None]]:
    """The batch size of every forward pass of ``model`` from now on, and the function that stops recording."""
    seen: list[int] = []
    handle = model.register_forward_pre_hook(lambda _module, args: seen.append(int(args[0].shape[0])))
    return seen, handle.remove


def _bench_certification(
    case: ModelCase, model, device, sz: dict, repeats: int, ctx, log, cases: list[CertCase] | None = None
) -> dict:
    """Interleaved timings of cert / forward / baseline for every certificate of ``cases`` on one model (default:
    :func:`cert_cases` and :func:`sequential_cases`)."""
    gen_dev = torch.Generator(device=device).manual_seed(0)
    gen_cpu = torch.Generator().manual_seed(0)
    nb = sz["noise_batch"]
    if cases is None:
        cases = cert_cases(case, sz) + sequential_cases(case, sz)
    xs = {c.key: _quantized_images(c.images, case.shape, case.q, device, gen_cpu) for c in cases}
    C = case.num_classes

    def certify(c: CertCase) -> Certificates:
        """As the driver certifies: a stream of batches (:meth:`Procedure.certify_batches`), here in memory."""
        x = xs[c.key]
        gen = c.generator(device, len(x))
        k = c.batch_size or len(x)
        batches = ((x[i : i + k], gen[i : i + k] if isinstance(gen, list) else gen, None) for i in range(0, len(x), k))
        with ctx():
            parts = [cert for _, cert in c.procedure.certify_batches(model, batches, c.noise, C, noise_batch=nb)]
        return Certificates.concat(parts)

    # the forward passes of a case whose procedure decides them per image: counted in a run of it
    sizes, counted = {}, {}
    for c in cases:
        if c.rounds:
            sizes[c.key] = [b for m in c.rounds for b in _chunk_sizes(len(xs[c.key]), m, nb)]
            continue
        seen, stop = _record_batches(model)
        try:
            cert = certify(c)
        finally:
            stop()
        total = sum(seen)
        sizes[c.key] = [nb] * (total // nb) + ([total % nb] if total % nb else [])
        counted[c.key] = {"cert_forward_calls": len(seen), "cert_mean_batch": total / max(len(seen), 1)}
        if SAMPLES_COLUMN in cert.values:  # the forward passes spent per image, as certificates.csv records them
            counted[c.key]["samples"] = [int(v) for v in cert.values[SAMPLES_COLUMN]]
    passes = {m: sum(s) for m, s in sizes.items()}
    buf = torch.rand(max(max(s) for s in sizes.values()), *case.shape, generator=gen_dev, device=device)

    def run(c: CertCase, variant: str):
        if variant == "cert":
            return certify(c).counts
        with ctx():
            if variant == "forward":
                return _forward_limit(model, sizes[c.key], buf)
            return c.baseline(model, xs[c.key], c, C, nb, c.generator(device, len(xs[c.key])))

    # warm-up (and, with --compile, compilation for every batch size)
    for c in cases:
        for variant in VARIANTS:
            run(c, variant)
    times: dict = {c.key: {v: [] for v in VARIANTS} for c in cases}
    for r in range(repeats):
        for c in cases:
            order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]  # rotate the order between repeats
            for variant in order:
                times[c.key][variant].append(_timed(lambda c=c, v=variant: run(c, v), device))
        log(f"  {case.name}: repeat {r + 1}/{repeats} done")
    out = {}
    for c in cases:
        med = {v: _median(times[c.key][v]) for v in VARIANTS}
        out[c.key] = {
            "forward_passes": passes[c.key],
            "batch_sizes": sorted(set(sizes[c.key])),
            "seconds": {v: times[c.key][v] for v in VARIANTS},
            "passes_per_second": {v: passes[c.key] / med[v] for v in VARIANTS},
            "row": c.row,
            "images": len(xs[c.key]),
            **c.info,
            **counted.get(c.key, {}),
        }
    out["noise_batch"] = nb
    return out


def _bench_training(
    case: ModelCase, builder, device, repeats: int, ctx, *, batch: int = 64, budget: float = 0.5, channels_last=False
) -> dict:
    """Noise sampling's share of a training step (forward + backward + SGD step), per method.

    On a GPU the isolated ``sample`` time includes a synchronisation, so it is an upper bound.
    """
    torch.manual_seed(0)
    model = builder().to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(1)
    x = _quantized_images(batch, case.shape, case.q, device, gen)
    y = torch.randint(0, case.num_classes, (batch,), generator=gen).to(device)
    noises = {noise.name: noise for noise in train_noises(case)}

    def step(noise):
        with ctx():
            inp = x if noise is None else noise.sample(x)
            loss = F.cross_entropy(model(inp), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    variants = {"none": None, **noises}
    for v in variants.values():  # warm-up
        step(v)
    steps = {k: [] for k in variants}
    samples = {k: [] for k in noises}
    # a training step on a small model is short: repeat enough to get stable medians
    t_one = _timed(lambda: step(None), device)
    reps = max(repeats, min(200, int(budget / max(t_one, 1e-6))))
    inner = max(1, min(100, int(2e-3 / max(t_one, 1e-9))))
    for r in range(reps):
        keys = list(variants)
        keys = keys[r % len(keys) :] + keys[: r % len(keys)]
        for k in keys:
            steps[k].append(_timed(lambda v=variants[k]: step(v), device))
        for k, noise in noises.items():
            with ctx():
                samples[k].append(_timed(lambda nz=noise: [nz.sample(x) for _ in range(inner)], device) / inner)
    base = _median(steps["none"])
    return {
        "batch": batch,
        "step_seconds": {k: _median(v) for k, v in steps.items()},
        "sample_seconds": {k: _median(v) for k, v in samples.items()},
        "overhead": {k: _median(samples[k]) / base for k in noises},
        "overhead_direct": {k: _median(steps[k]) / base - 1.0 for k in noises},
        "repeats": reps,
    }


def _prepare(case: ModelCase, device, args) -> tuple[Callable, torch.nn.Module]:
    def builder():
        return normalized(case.net(), *_normalisation(case.data))

    torch.manual_seed(0)
    model = builder().to(device).eval()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.compile:
        model = torch.compile(model)
    return builder, model


def run_bench(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but CUDA is not available")
    if args.models:
        unknown = [m for m in args.models if m not in CASES]
        if unknown:
            raise SystemExit(f"bench: unknown model(s) {unknown}; choose from {sorted(CASES)}")
        names = list(args.models)
    else:
        names = [m for m, c in CASES.items() if not c.cuda_only or device.type == "cuda"]

    def ctx():
        if args.bf16:
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    result: dict = {}
    raw: dict = {}
    for name in names:
        case = CASES[name]
        if args.quick:
            sz = dict(case.quick_sizes)
        else:
            sz = dict(case.sizes.get(device.type) or case.sizes.get("cuda") or case.quick_sizes)
        if args.noise_batch:
            sz["noise_batch"] = args.noise_batch
        if args.images:
            sz["images"] = args.images
        log(f"{name}: {sz}")
        builder, model = _prepare(case, device, args)
        cert = _bench_certification(case, model, device, sz, args.repeats, ctx, log)
        train = _bench_training(
            case,
            builder,
            device,
            args.repeats,
            ctx,
            budget=0.05 if args.quick else 0.5,
            channels_last=args.channels_last,
        )
        raw[name] = {"certification": cert, "training": train}
        for key in _cert_keys(cert):
            pps = cert[key]["passes_per_second"]
            result.setdefault(f"{key}_vs_forward", {})[name] = pps["cert"] / pps["forward"]
        for key in _cert_keys(cert):
            pps = cert[key]["passes_per_second"]
            result.setdefault(f"{key}_vs_baseline", {})[name] = pps["cert"] / pps["baseline"]
        result.setdefault("train_noise_overhead", {})[name] = train["overhead"]
    result["train_noise_overhead_max"] = max(
        (v for per in result.get("train_noise_overhead", {}).values() for v in per.values()), default=float("nan")
    )
    result["raw"] = raw
    result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    result["device_type"] = device.type
    result["torch"] = torch.__version__
    result["threads"] = torch.get_num_threads()
    result["options"] = {
        "models": names,
        "repeats": args.repeats,
        "quick": args.quick,
        "channels_last": args.channels_last,
        "bf16": args.bf16,
        "compile": args.compile,
    }
    return result


def _cert_keys(cert: dict) -> list[str]:
    """The certificate cases of one model's certification results (every entry but the shared settings)."""
    return [k for k, v in cert.items() if isinstance(v, dict) and "passes_per_second" in v]


def format_table(result: dict) -> str:
    rows = [raw["certification"][k]["row"] for raw in result["raw"].values() for k in _cert_keys(raw["certification"])]
    w = max([10, *map(len, rows)])  # the method column fits the longest row label
    lines = [
        f"device: {result['device']} ({result['device_type']}), torch {result['torch']}, "
        f"{result['threads']} threads; forward passes per second, medians of {result['options']['repeats']} repeats",
        "",
        f"{'model':<11} {'method':<{w}} {'passes':>7} {'batch':>9} {'cert':>10} {'forward':>10} {'baseline':>10}"
        f" {'cert/fwd':>9} {'cert/base':>9}",
    ]
    per_image = []  # the cases that spent a data-dependent number of forward passes per image
    for name, raw in result["raw"].items():
        cert = raw["certification"]
        for key in _cert_keys(cert):
            c = cert[key]
            pps = c["passes_per_second"]
            bs = "/".join(str(b) for b in c["batch_sizes"])
            label = c["row"]
            lines.append(
                f"{name:<11} {label:<{w}} {c['forward_passes']:>7} {bs:>9} {pps['cert']:>10.0f} {pps['forward']:>10.0f}"
                f" {pps['baseline']:>10.0f} {pps['cert'] / pps['forward']:>9.3f} {pps['cert'] / pps['baseline']:>9.2f}"
            )
            if c.get("samples"):
                per_image.append((name, c))
    for name, c in per_image:
        pps, samples = c["passes_per_second"], np.asarray(c["samples"])
        median, p90 = np.median(samples), np.percentile(samples, 90)  # as metrics.json computes them
        lines += [
            "",
            f"{c.get('procedure', c['row'])} certification ({c['row']}) on {name}: {pps['cert']:.0f} forward passes/s"
            f" vs {pps['forward']:.0f} of plain batched forward passes of the same model: ratio "
            f"{pps['cert'] / pps['forward']:.3f} (target: within 10%, >= 0.90); "
            f"{pps['cert'] / pps['baseline']:.2f}x one image at a time",
            f"  forward passes per image over {len(samples)} images: mean {sum(samples) / len(samples):.0f}, "
            f"median {median:.0f}, p90 {p90:.0f} (cap n0 + n = {c['n0'] + c['n']}); "
            f"{c['cert_forward_calls']} forward calls of {c['cert_mean_batch']:.0f} inputs on average",
        ]
    lines += ["", "training step (batch 64, forward + backward + SGD): extra time from noise sampling"]
    for i, (name, raw) in enumerate(result["raw"].items()):
        t = raw["training"]
        o, od = t["overhead"], t["overhead_direct"]
        if i == 0:  # the noises measured, in the order measured (every model measures the same ones)
            heads = "".join(f" {k:>9}" for k in o)
            initials = " / ".join(k[0] for k in o)
            lines.append(f"{'model':<11} {'step (no noise)':>16}{heads}   (direct: {initials})")
        cells = "".join(f" {v:>9.2%}" for v in o.values())
        direct = " / ".join(f"{v:+.1%}" for v in od.values())
        lines.append(f"{name:<11} {t['step_seconds']['none'] * 1e3:>13.2f} ms{cells}   ({direct})")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ssn_exp.bench",
        description="Forward passes per second of the certification path vs plain forward passes and a "
        "straightforward baseline, and the cost of training noise.",
    )
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument(
        "--models", nargs="+", metavar="NAME", help=f"models to run (default: all for the device; {sorted(CASES)})"
    )
    p.add_argument("--device", default=default_device, choices=["cpu", "cuda"], help=f"default: {default_device}")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats; medians are reported (default 5)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (smoke test)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--noise-batch", type=int, help="override the per-model noise_batch")
    p.add_argument("--images", type=int, help="override the number of images certified with DSSN")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (GPU)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("bench: --repeats must be >= 1")
    if args.quick:
        args.repeats = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_bench(args, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_table(result))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(path, json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
