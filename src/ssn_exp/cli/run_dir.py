"""The run directory of an entry point (layer 3): what a start records and undoes, and the lock.

:class:`RunDirGuard` (a Hydra callback, ``hydra.callbacks`` in the configs) records the run directory before
Hydra writes anything into it, so that a failed or refused start removes only what it created and puts back
the ``.hydra/`` record of an earlier run byte for byte (:func:`ssn_exp.cli.errors.guard` calls
:meth:`StartRecord.undo`). :class:`RunLock` keeps a second process out of a run directory in use.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path

from ssn_exp.atomic import replace_file
from ssn_exp.cli.messages import is_user_error, one_line
from ssn_exp.exceptions import LinkedRunFileError, UserError

__all__ = ["RunDirGuard", "RunLock", "RunLockedError", "StartRecord", "SweepRecord"]

log = logging.getLogger("ssn_exp")

#: What Hydra writes into a run directory before the task starts (besides the job log), and the lock.
_HYDRA_ONLY = {".hydra", ".ssn_exp.lock"}


class RunLockedError(UserError, RuntimeError):
    """Another process is running in the same run directory."""


#: (the atomic writer of run files this module restores: a link at the path is replaced, never written through)
_write_new_file = replace_file


#: The files Hydra writes into .hydra/ before the task starts.
_HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")


def _snapshot(out: Path, log_name: str) -> dict[str, tuple]:
    """Name -> (kind, size, mtime) of what ``out`` holds besides Hydra's files, the log and the lock: what a run
    makes."""
    snap = {}
    try:
        entries = list(os.scandir(out))
    except OSError:
        return snap
    for e in entries:
        if e.name in _HYDRA_ONLY or e.name == log_name:
            continue
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        snap[e.name] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return snap


#: A folder this process created: its path (absolute, as given: ``..`` is not folded away) and an open descriptor of
#: it, which keeps its inode from being reused: a folder made at that path later (by the user, by another run) can
#: never pass for it, as one with the same (st_dev, st_ino) could once the original is gone.
_MadeDir = tuple[Path, int]


def _make_dirs(path: Path | str) -> list[_MadeDir]:
    """Create ``path`` and its missing parents, the same folders ``Path(path).mkdir(parents=True)`` makes (what
    Hydra calls next, then a no-op), one ``os.mkdir`` at a time, and return the ones this call made, deepest first.

    A folder that exists already, or that another process makes meanwhile, is not in the list: only an
    ``os.mkdir`` that succeeded here counts, so undoing a start can never remove a folder it did not make. If a
    folder cannot be made, those made so far are removed again and the ``OSError`` is raised.
    """
    p = Path(os.path.abspath(os.getcwd())) / Path(path)  # absolute, but ".." kept as the kernel resolves it
    missing = []
    while not os.path.lexists(p) and p.parent != p:  # (a file on the way fails below, as in mkdir: "Not a directory")
        missing.append(p)
        p = p.parent
    if not missing and not os.path.isdir(p):  # the folder itself is a file (mkdir would say only "File exists")
        raise NotADirectoryError(errno.ENOTDIR, "a file is there, not a folder; give a run or sweep folder", str(p))
    made: list[_MadeDir] = []
    try:
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:
                if os.path.isdir(d):  # made by someone else in the meantime (or "x/.."): not ours
                    continue
                raise
            try:
                made.append((d, os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)))
            except OSError:  # (out of descriptors, say): the folder just made goes too
                with contextlib.suppress(OSError):
                    os.rmdir(d)
                raise
    except OSError:
        _remove_created_dirs(made[::-1])
        raise
    return made[::-1]


def _remove_created_dirs(made: list[_MadeDir]) -> None:
    """Remove the folders of :func:`_make_dirs`, deepest first, each only while it is empty and still the very
    folder this process made (not one put at its path since); stop at the first that stays. Their descriptors
    are closed."""
    try:
        for d, fd in made:
            try:
                st = os.lstat(d)
            except FileNotFoundError:
                continue  # removed meanwhile: the folders above it may still be this process's, and empty
            except OSError:
                break
            if not stat.S_ISDIR(st.st_mode) or not os.path.samestat(st, os.fstat(fd)):
                break  # another folder (or a link) at that path now: not ours, and so neither are those above it
            try:
                os.rmdir(d)
            except OSError:
                break
    finally:
        for _, fd in made:
            with contextlib.suppress(OSError):
                os.close(fd)


class StartRecord:
    """The state of a run directory before Hydra wrote into it (taken by :class:`RunDirGuard`)."""

    current: StartRecord | None = None

    def __init__(self, out: Path | str, log_name: str):
        self.out = Path(os.path.abspath(out))
        self.log_name = log_name
        self.undone = False
        # The run directory and its missing parents, made here (not by Hydra, whose mkdir(exist_ok=True) cannot
        # tell which folders it made): exactly the folders this process created, deepest first.
        self.created_dirs = _make_dirs(out)
        self.existed = {n for n in (".hydra", log_name, ".ssn_exp.lock") if os.path.lexists(self.out / n)}
        self.hydra_bytes: dict[str, bytes] = {}
        for name in _HYDRA_FILES:
            f = self.out / ".hydra" / name
            if f.is_file() and not f.is_symlink():
                self.hydra_bytes[name] = f.read_bytes()
        log_file = self.out / log_name
        self.log_size = log_file.stat().st_size if log_file.is_file() and not log_file.is_symlink() else None
        self.snapshot = _snapshot(self.out, log_name)

    def undo(self, others_run_here: bool = False) -> None:
        """After a failed or refused start: put the run directory back as it was before Hydra wrote into it.

        Only a start that made nothing besides Hydra's files and the lock is undone (a run that trained or
        certified keeps its directory and log). ``.hydra/*.yaml`` of an earlier run get their bytes back, the
        files and folders this process created are removed, and a log that existed is cut back to its length.
        If another process holds the directory's lock, only the ``.hydra/`` record is put back (the log and
        the lock are that process's).
        """
        if self.undone:
            return
        self.undone = True
        out = self.out
        if not out.is_dir():
            _remove_created_dirs(self.created_dirs)
            return
        others_run_here = others_run_here or not self._lock_is_free()
        if not others_run_here and _snapshot(out, self.log_name) != self.snapshot:
            return  # this start did more than start: what it made is a run's
        hydra_dir = out / ".hydra"
        if hydra_dir.is_dir() and not hydra_dir.is_symlink():
            for name in _HYDRA_FILES:
                f = hydra_dir / name
                if name in self.hydra_bytes:
                    if f.is_symlink() or not f.is_file() or f.read_bytes() != self.hydra_bytes[name]:
                        _write_new_file(f, self.hydra_bytes[name])
                elif f.is_file() and not f.is_symlink():
                    f.unlink()
            if ".hydra" not in self.existed:
                with contextlib.suppress(OSError):
                    hydra_dir.rmdir()  # only if nothing else is in it
        if others_run_here:
            return
        log_file = out / self.log_name
        if self.log_name not in self.existed:
            _close_file_handlers(log_file)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(log_file)
        elif self.log_size is not None and log_file.is_file() and not log_file.is_symlink():
            _close_file_handlers(log_file)
            if log_file.stat().st_size > self.log_size:
                with open(log_file, "r+b") as fh:
                    fh.truncate(self.log_size)
        if ".ssn_exp.lock" not in self.existed:
            lock = out / ".ssn_exp.lock"
            if lock.is_file() and not lock.is_symlink():
                lock.unlink()
        _remove_created_dirs(self.created_dirs)

    def _lock_is_free(self) -> bool:
        try:
            with RunLock(self.out):
                return True
        except (RunLockedError, OSError):
            return False


def _close_file_handlers(path: Path) -> None:
    """Close the logging handlers writing to ``path`` (Hydra's job log) before it is removed or cut back."""
    target = os.path.abspath(path)
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for h in list(getattr(logger, "handlers", [])):
            if isinstance(h, logging.FileHandler) and os.path.abspath(h.baseFilename) == target:
                logger.removeHandler(h)
                h.close()


class SweepRecord:
    """The sweep directory of a multirun before Hydra's sweeper wrote into it (taken by :class:`RunDirGuard`)."""

    current: SweepRecord | None = None

    def __init__(self, sweep_dir: Path | str):
        self.dir = Path(os.path.abspath(sweep_dir))
        self.undone = False
        self.jobs_started = 0  # jobs this process started (on_job_start); a launcher may run them elsewhere
        self.created_dirs = _make_dirs(sweep_dir)  # exactly the folders this process made, deepest first
        record = self.dir / "multirun.yaml"
        self.record_existed = os.path.lexists(record)
        self.record_bytes = record.read_bytes() if record.is_file() and not record.is_symlink() else None
        self.snapshot = _snapshot(self.dir, "multirun.yaml")

    def undo(self) -> bool:
        """After a multirun failed: if no job started (none here, and the sweep directory holds nothing new but
        ``multirun.yaml``), put ``multirun.yaml`` back as it was (an earlier sweep's, byte for byte, or none),
        remove the folders this process created, and return True. Else change nothing and return False."""
        if self.undone:
            return True
        if self.jobs_started or not self.dir.is_dir() or _snapshot(self.dir, "multirun.yaml") != self.snapshot:
            return False
        self.undone = True
        record = self.dir / "multirun.yaml"
        if self.record_bytes is not None:
            if record.is_symlink() or not record.is_file() or record.read_bytes() != self.record_bytes:
                _write_new_file(record, self.record_bytes)
        elif not self.record_existed and record.is_file() and not record.is_symlink():
            record.unlink()
        _remove_created_dirs(self.created_dirs)
        return True


class RunDirGuard:
    """Hydra callback (``hydra.callbacks.run_dir``): runs before Hydra creates the run directory, its log and
    ``.hydra/``. It refuses, in one line, a run file that is a symbolic link (Hydra would write through it),
    makes the run directory and its missing parents itself (so that it knows exactly which folders this start
    created) and records the directory as it is, for :func:`guard` to undo a failed start.

    A multirun is recorded the same way before Hydra's sweeper writes the sweep directory and its
    ``multirun.yaml`` (:class:`SweepRecord`): a sweep that fails before any job starts (a job's config that
    does not compose) leaves the sweep directory as it was. Jobs have no hook before Hydra writes their folder:
    their lock and result files still refuse links (:class:`RunLock`, ``results``), and a failed job keeps
    its folder with ``error.txt`` for the report.
    """

    def on_run_start(self, config, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        StartRecord.current = None
        with contextlib.suppress(Exception):  # as run_job does first: ${hydra:...} may name the run directory
            HydraConfig.instance().set_config(config)
        try:
            given = str(OmegaConf.select(config, "hydra.run.dir", throw_on_missing=True))  # as run_job reads it
            out = Path(os.path.abspath(given))
            log_name = f"{OmegaConf.select(config, 'hydra.job.name') or 'ssn_exp'}.log"
        except Exception:  # noqa: BLE001 - a bad run directory: Hydra reports it in run_job, before writing anything
            return
        self._refuse_links(out, log_name)
        StartRecord.current = _exit_on_os_error(lambda: StartRecord(given, log_name))

    def on_multirun_start(self, config, **kwargs) -> None:
        from omegaconf import OmegaConf

        SweepRecord.current = None
        try:  # (the sweeper resolves the same node of the same config: ${now:...} is cached, the same folder)
            given = str(OmegaConf.select(config, "hydra.sweep.dir", throw_on_missing=True))
        except Exception:  # noqa: BLE001 - a bad sweep directory: Hydra reports it before writing anything
            return
        if os.path.islink(Path(given) / "multirun.yaml"):
            _refuse_link(Path(os.path.abspath(given)) / "multirun.yaml", "hydra.sweep.dir=DIR")
        SweepRecord.current = _exit_on_os_error(lambda: SweepRecord(given))

    def on_job_start(self, config, **kwargs) -> None:
        if SweepRecord.current is not None:
            SweepRecord.current.jobs_started += 1

    # Hydra calls every hook of its Callback interface; the others have nothing to do.
    def on_run_end(self, config, **kwargs) -> None:
        pass

    def on_multirun_end(self, config, **kwargs) -> None:
        pass

    def on_job_end(self, config, job_return, **kwargs) -> None:
        pass

    @staticmethod
    def _refuse_links(out: Path, log_name: str) -> None:
        names = [log_name, ".ssn_exp.lock", ".hydra", *(os.path.join(".hydra", n) for n in _HYDRA_FILES)]
        for name in names:
            if os.path.islink(out / name):
                _refuse_link(out / name)


def _refuse_link(path: Path, elsewhere: str = "tag=NAME or hydra.run.dir=DIR") -> None:
    # Hydra's callbacks turn exceptions into warnings: leave here, in one line, before anything is written
    print(
        f"error: {path} is a symbolic link; ssn_exp does not write run files through links: "
        f"remove it, or give the run another directory ({elsewhere})",
        file=sys.stderr,
    )
    sys.exit(2)


def _exit_on_os_error(make: Callable):
    """``make()``; an ``OSError`` (a run directory that cannot be created) ends in one line, exit status 2 (Hydra's
    callbacks turn exceptions into warnings, and Hydra would then make the same folders and fail there)."""
    try:
        return make()
    except OSError as exc:
        if os.environ.get("SSN_EXP_TRACEBACK") == "1" or not is_user_error(exc):
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)


class RunLock:
    """An exclusive lock on a run directory (``.ssn_exp.lock``, flock): a second process is refused at once.

    The file holds the holder's pid while it runs. It is never followed if it is a symbolic link (refused), and
    it is removed when the holder ends (emptied instead if it was there before), so a finished run keeps no
    stale pid.
    """

    def __init__(self, out_dir: Path, name: str = ".ssn_exp.lock"):
        self.path = Path(out_dir) / name  # (a job shard's: .ssn_exp.shard{j}of{J}.lock, see CertifyRun.lock_name)
        self._fd: int | None = None
        self._created = False

    def _open(self) -> tuple[int, bool]:
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            pass
        try:
            return os.open(self.path, flags), False
        except OSError as exc:
            if os.path.islink(self.path):
                raise LinkedRunFileError(
                    f"{self.path} is a symbolic link; ssn_exp does not write run files through links: remove it, "
                    "or give the run another directory (tag=NAME or hydra.run.dir=DIR)"
                ) from None
            if exc.errno == errno.ENOENT:  # removed by a holder that just ended
                return self._open()
            raise

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            fd, created = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise RunLockedError(
                    f"another ssn_exp process (pid {pid}) is running in {self.path.parent}; wait for it to finish, "
                    "or give this run its own directory (tag=NAME)"
                ) from None
            try:  # the holder we waited for may have removed the file: lock the one at the path
                same = os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise RunLockedError(f"cannot lock {self.path}: it keeps being replaced")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd, self._created = fd, created
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            try:
                if self._created:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)  # while still held: a process waiting on it retries (see __enter__)
                else:
                    os.ftruncate(self._fd, 0)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None
        return False
