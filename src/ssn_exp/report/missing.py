"""Hydra job directories that have no results yet (not finished, failed, or still running)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MissingRun", "find_missing", "read_overrides"]


@dataclass(frozen=True)
class MissingRun:
    path: Path
    overrides: tuple[str, ...]
    error: str = ""  # the job's one-line error (error.txt) if it failed

    def __str__(self) -> str:
        text = f"{self.path}: {' '.join(self.overrides) if self.overrides else '(no overrides recorded)'}"
        return f"{text} -- failed: {self.error}" if self.error else text


def read_overrides(job_dir) -> tuple[str, ...]:
    """The override strings of a Hydra job (``.hydra/overrides.yaml``, a YAML list); () if unreadable."""
    path = Path(job_dir) / ".hydra" / "overrides.yaml"
    try:
        text = path.read_text()
    except OSError:
        return ()
    try:
        import yaml

        data = yaml.safe_load(text)
        if isinstance(data, list):
            return tuple(str(x) for x in data)
    except Exception:  # noqa: BLE001 - fall back to reading "- item" lines
        pass
    return tuple(line.strip()[2:].strip().strip("'\"") for line in text.splitlines() if line.strip().startswith("- "))


def find_missing(paths: Iterable) -> list[MissingRun]:
    """Every job dir (one holding ``.hydra/``) at or below the paths that has no ``metrics.json``.

    Folders of published arrays (with ``index.csv``) are skipped.
    """
    found: dict[Path, MissingRun] = {}
    for p in map(Path, paths):
        if not p.is_dir() or (p / "index.csv").is_file():
            continue
        for hydra in sorted(p.rglob(".hydra")):
            job = hydra.parent
            if hydra.is_dir() and not (job / "metrics.json").is_file():
                error = ""
                if (job / "error.txt").is_file():
                    error = " ".join((job / "error.txt").read_text().split())
                found.setdefault(job.resolve(), MissingRun(job, read_overrides(job), error))
    return sorted(found.values(), key=lambda m: _natural(m.path))


def _natural(path: Path) -> tuple:
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts)
