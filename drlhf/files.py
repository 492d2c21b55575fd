"""Writing files: every writer of the project goes through here (a leaf module: it imports nothing from drlhf).

    atomic_write(path, lambda tmp: ...)        # the file (or folder, folder=True) appears whole or not at all
    write_text(path, text); write_json(path, obj); save_safetensors(tensors, path)
    make_dir(path, "--out")                    # a folder a script writes into, or one sentence naming the flag
    hold_folder(path, "a PPO run", "--out")    # one process per output folder for its whole life, of one kind
    default_cache_dir(); cache_lock(path)      # where toy models and downloads are cached, one writer at a time

Everything is written to a temporary sibling and renamed, so an interrupted write leaves the old file or
nothing, never half a file. Files get the permissions the user's umask gives any new file (0644 by default).
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Callable

from safetensors.torch import save_file


class WriteError(OSError):
    """A file or folder could not be written for a reason outside the program (disk full, read-only, no
    permission). drlhf.cli.run prints it as one line, like every other user error."""

    def __str__(self):
        return self.args[0]


def _disk_problem(e: Exception) -> str | None:
    """Why a write failed, when the disk (not the program) is the cause; None otherwise. safetensors and
    torch.save report a full disk in their own exception types, so their messages are read too."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
        return os.strerror(e.errno).lower()
    text = str(e)
    if "No space left on device" in text or "os error 28" in text or "unexpected pos" in text:
        return "no space left on device"
    return None


def make_dir(path: Path, flag: str = "--output-dir / --out") -> Path:
    """Create the folder `path` (and its parents) for a script's output; a folder that cannot be created or
    written into (a read-only mount, no permission, a file in the way) is one WriteError naming `flag`."""
    path = Path(path)
    check_writable(path, flag)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise WriteError(f"cannot create the folder {path}: a file of that name is in the way; choose another "
                         f"{flag}") from None
    except OSError as e:
        reason = _disk_problem(e) or os.strerror(e.errno or 0).lower()
        raise WriteError(f"cannot create the folder {path}: {reason}; choose a writable {flag}") from None
    return path


def check_writable(path: Path, flag: str = "--output-dir / --out"):
    """Raise a WriteError naming `flag` unless the folder `path` exists and can be written into, or can be created
    (its nearest existing ancestor is a writable folder). Creates nothing."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise WriteError(f"cannot create the folder {path}: {existing} is a file; choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        reason = "read-only file system or no permission"
        raise WriteError(f"cannot {'write into' if existing == path else 'create'} the folder {path}: {reason} "
                         f"({existing}); choose a writable {flag}")


def _new_file_mode() -> int:
    """The mode a plain new file gets under the current umask (0644 with the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _chmod_tree(path: Path, mode: int):
    """Give every file under `path` (or `path` itself) `mode`: safetensors and tempfile write 0600."""
    for p in ([path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]):
        os.chmod(p, mode)


def atomic_write(path: Path, write: Callable[[Path], object], folder: bool = False):
    """write(tmp) creates the file (or fills the folder, folder=True) `.NAME.tmp` next to path; tmp is then
    renamed to path, replacing what was there. An interrupted write leaves no file of that name half-written,
    and its leftover tmp is replaced by the next write of the same path. One writer per path at a time."""
    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    try:
        make_dir(path.parent)
        remove(tmp)  # left by an interrupted write
        if folder:
            tmp.mkdir()
        write(tmp)
        _chmod_tree(tmp, _new_file_mode())
        if folder and path.exists():  # a folder cannot replace a folder in one rename: the old one steps aside first
            remove(old)
            os.replace(path, old)
        os.replace(tmp, path)
        remove(old)
    except WriteError:
        raise
    except Exception as e:  # noqa: BLE001 - a full or read-only disk is the user's to fix, anything else a bug
        reason = _disk_problem(e)
        if reason is None:
            raise
        raise WriteError(f"could not write {path}: {reason}; nothing was half-written (the previous version, if any, "
                         "is intact). Free space or choose another output folder (--output-dir / --out)") from None
    finally:
        remove(tmp)


def remove(path: Path):
    """Delete a file, link or folder tree if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def first_free(path: Path, numbered: str = "{name}-{n}", start: int = 2, bare: bool = True) -> Path:
    """The first name that is not taken: `path` itself (if bare), then `numbered` with n = start, start + 1, ..."""
    path, n = Path(path), start
    if bare and not path.exists():
        return path
    while (candidate := path.with_name(numbered.format(name=path.name, n=n))).exists():
        n += 1
    return candidate


def move_aside(path: Path) -> Path:
    """Rename the folder `path` to PATH.old-N, the first N not taken, and return that name: what a user had is kept
    whole beside what replaces it."""
    aside = first_free(path, "{name}.old-{n}", start=1, bare=False)
    os.replace(path, aside)
    return aside


def write_text(path: Path, text: str):
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj):
    """Strict JSON that every parser reads: a non-finite number (NaN, inf: a statistic of nothing) is written as null."""
    write_text(path, json.dumps(finite_or_none(obj), indent=1, allow_nan=False))


def finite_or_none(obj):
    """obj with every non-finite float inside dicts, lists and tuples replaced by None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def save_safetensors(tensors: dict, path: Path):
    """A state dict as safetensors (contiguous CPU copies), atomically."""
    atomic_write(path, lambda tmp: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp))


# ---------------------------------------------------------------------------------------------------------
# The cache of toy models, downloads and compiled kernels
# ---------------------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    return Path(os.environ.get("DRLHF_CACHE", Path.home() / ".cache" / "drlhf"))


@contextlib.contextmanager
def cache_lock(path: Path):
    """Processes that need the same cache entry (two runs started together, parallel test workers) take turns:
    the first trains it, the others wait and then load it. An flock, released even when its holder dies."""
    make_dir(Path(path).parent, "--cache-dir (or $DRLHF_CACHE)")
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock, at worst the entry is trained twice (writes are atomic)
        yield
        return
    with open(Path(path).parent / f".{Path(path).name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


# ---------------------------------------------------------------------------------------------------------
# One process per output folder
# ---------------------------------------------------------------------------------------------------------
class FolderInUse(WriteError):
    """Another live process holds the output folder (hold_folder); the message names it and the flag."""


_HELD: dict[Path, object] = {}  # folder -> the open lock file of this process

# what each script's output folder holds (files that only that kind has), so that no script writes into another's
OUTPUT_KINDS = {"a PPO run": ("args.json", "checkpoints", "final_policy", "summary.json"),  # train_ppo.py
                "a reward model": ("model.safetensors",),                                 # train_reward.py
                "a labeling dataset": ("dataset.json", "tasks.jsonl"),                     # sample.py
                "an evaluation": ("scores.json",)}                                         # sample.py eval


def check_kind(path: Path, kind: str, flag: str):
    """Refuse to write `kind` (a key of OUTPUT_KINDS) into a folder that holds another kind's files (a reward model
    into a run folder, a run into a dataset), naming what is there and `flag`."""
    for other, markers in OUTPUT_KINDS.items():
        found = [m for m in markers if (Path(path) / m).exists()]
        if other != kind and found:
            raise WriteError(f"{flag} {path} holds {other} ({', '.join(found)}), not {kind}: writing into it would mix "
                             f"the two; choose another {flag}")


def lock_file(path: Path) -> Path:
    """Where the lock of the folder `path` lives: a hidden file beside it (PARENT/.NAME.lock), so that the lock can be
    taken before the folder exists and a run that stops early leaves no folder."""
    return Path(path).with_name(f".{Path(path).name}.lock")


def flock_or_holder(lock: Path):
    """An exclusive flock on the file `lock` for this process, with who holds it written inside ("host, pid, since"),
    released by the OS when the process ends, even by SIGKILL. Returns (the open file, None); (None, the holder's
    line) when another live process holds it; (None, None) where nothing can be locked (not POSIX, a folder that
    cannot be written, a file system without flock). A file its holder removed between our open and our lock is
    not kept: the one now at `lock` is locked instead."""
    try:
        import fcntl
    except ImportError:
        return None, None
    while True:
        try:
            Path(lock).parent.mkdir(parents=True, exist_ok=True)
            f = open(lock, "a+")
        except OSError:
            return None, None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            return None, holder
        except OSError:  # a file system without flock (some network mounts)
            f.close()
            return None, None
        try:
            current = os.stat(lock).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(f.fileno()).st_ino:
            break
        f.close()
    f.truncate(0)
    f.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    f.flush()
    return f, None


def hold_folder(path: Path, kind: str, flag: str = "--output-dir / --out"):
    """Make this process the only writer of the folder `path` until it ends, and refuse it when it holds another
    script's kind of folder (check_kind): an flock on lock_file(path) (flock_or_holder), taken before anything is
    looked at or written and released by the OS when the process ends (so a dead run never blocks the next). A
    second process is refused with a FolderInUse naming `flag` and the holder (host, pid, since when). Holding the
    same folder again is a no-op; release_folders() lets go early and removes the lock files."""
    shown, path = path, Path(os.path.realpath(path))
    if path not in _HELD:
        f, holder = flock_or_holder(lock_file(path))
        if holder is not None:
            raise FolderInUse(f"{flag} {shown} is in use by another process ({holder}); wait until it ends, or choose "
                              f"another {flag}")
        if f is not None:
            _HELD[path] = f
    check_kind(shown, kind, flag)


def release_folders():
    """Let go of every folder this process holds and remove their lock files (drlhf.cli.run calls it at exit; the
    file is removed while it is still locked, so a process that opens it meanwhile sees a stale inode and retries)."""
    for path, f in list(_HELD.items()):
        with contextlib.suppress(OSError):
            os.unlink(lock_file(path))
        f.close()
    _HELD.clear()


def download_once(url: str, path: Path):
    """Fetch url to path unless it is there; a partial download never takes the final name. Raises OSError."""
    import urllib.request
    if path.exists():
        return
    atomic_write(path, lambda tmp: urllib.request.urlretrieve(url, tmp))
