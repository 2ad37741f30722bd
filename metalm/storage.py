"""The one storage layer: every location metalm reads or writes by name goes through here.

A location is one of

* a local path, or ``file://PATH`` (the same thing);
* an fsspec URL: ``s3://bucket/key`` (package s3fs), ``gs://`` (gcsfs), ``https://`` and ``http://`` (aiohttp;
  read-only), ``hf://datasets/...`` (huggingface_hub), ``memory://`` (in-process, for tests), or any other
  protocol fsspec knows;
* ``pipe:COMMAND`` (WebDataset's convention, read-only): a shell command whose standard output is the file.
  A directory is a command template: ``{}`` in it is replaced by the file's path relative to the directory
  (shell-quoted), e.g. ``pipe:aws s3 cp s3://bucket/shards/{} -``; without ``{}`` the path is appended after
  a ``/``, e.g. ``pipe:cat /data/shards`` reads ``cat /data/shards/train/shard-000000.tar``.

A URL is never turned into a local path (``Path("s3://b/x")`` would be the local directory ``s3:/b/x``): the
functions below keep the two apart, and a URL whose scheme needs a package that is not installed is a
`StorageError` naming the package. Credentials are never part of a location or of a metalm config: each
fsspec implementation reads them from the environment and its standard files (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_ENDPOINT_URL`` or ``~/.aws/``, ``GOOGLE_APPLICATION_CREDENTIALS``, ``HF_TOKEN``),
and nothing here prints or stores them. A location with inline credentials (``s3://key:secret@bucket``) is
refused, so that one can never reach a config, a log line or a checkpoint.

Writes are atomic: an object or file appears complete or not at all. Local files are written to a temporary
name, fsynced and renamed (`metalm.fsutil`); object stores (s3, gs, azure, memory) publish an object only when
its upload completes (a single PUT, or the completion of a multipart upload); any other fsspec filesystem gets
a temporary name and a move.

No torch import: the data-preparation processes use this module too.
"""
from __future__ import annotations

import abc
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from collections.abc import Callable

from metalm.fsutil import fsync_dir, write_atomic

T = TypeVar("T")

# scheme -> the package that implements it for fsspec (the ones metalm documents; fsspec names others itself)
SCHEME_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp",
                   "https": "aiohttp", "hf": "huggingface_hub", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}
PIP_EXTRAS = {"s3fs": "metalm[s3]", "gcsfs": "metalm[gcs]"}
READ_ONLY_SCHEMES = ("http", "https", "pipe")
ATOMIC_PUT_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


class StorageError(OSError):
    """A location that cannot be used as asked: a scheme without its package, a read-only location written
    to, a failed pipe: command, inline credentials. The message names the location (never a credential)."""

    def __init__(self, message: str):
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.args[0])


# ---------------------------------------------------------------------------------------------- names


def scheme(location: str) -> str:
    """"s3", "https", "pipe", ...; "" for a local path (and for file://)."""
    location = str(location)
    if location.startswith("pipe:"):
        return "pipe"
    m = _SCHEME.match(location)
    if not m or m.group(1).lower() == "file":
        return ""
    return m.group(1).lower()


def is_url(location: str | os.PathLike) -> bool:
    """A remote location (fsspec URL or pipe:), i.e. anything but a local path or file:// URL."""
    return scheme(str(location)) != ""


def is_pipe(location: str) -> bool:
    return str(location).startswith("pipe:")


def local_path(location: str | os.PathLike) -> Path:
    """The local path of a local location (a path or file:// URL); ValueError for a URL."""
    location = str(location)
    if is_url(location):
        raise ValueError(f"{location} is a URL, not a local path")
    if location.startswith("file://"):
        location = location[len("file://"):]
    return Path(os.path.expanduser(location))


def join(location: str | os.PathLike, *parts: str) -> str:
    """`location`/part/...: '/'-joined for URLs, os.path.join for local paths. A pipe: template is kept as a
    template (the parts are appended to the path substituted into it)."""
    location = str(location)
    if not parts:
        return location
    rel = "/".join(p.strip("/") for p in parts if p)
    if is_pipe(location):  # a template for the directory below: its files' paths go where {} is
        if "{}" in location:
            return location.replace("{}", rel + "/{}", 1)
        return location.rstrip("/") + "/" + rel
    if is_url(location):
        return location.rstrip("/") + "/" + rel
    return str(local_path(location) / rel)


def absolute(location: str | os.PathLike) -> str:
    """A location that means the same from any working directory: a local path made absolute, a URL as is."""
    location = str(location)
    return location if is_url(location) else str(local_path(location).resolve())


def check_location(location: str, what: str, *, writable: bool = False) -> None:
    """Refuse what cannot work whatever is installed: inline credentials, writing to a read-only scheme, an
    empty pipe: command. `what` names the setting in the message (e.g. "data.shards")."""
    location = str(location)
    s = scheme(location)
    if s and s != "pipe":
        netloc = location[len(s) + 3:].split("/", 1)[0]
        if "@" in netloc and ":" in netloc.split("@", 1)[0]:
            raise StorageError(f"{what}: a URL with inline credentials (user:secret@host) is refused: put them in "
                               f"the environment or the standard config files of {SCHEME_PACKAGES.get(s, s)} "
                               f"instead (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
    if s == "pipe" and not location[len("pipe:"):].strip():
        raise StorageError(f"{what}={location!r}: an empty pipe: command")
    if writable and s in READ_ONLY_SCHEMES:
        raise StorageError(f"{what}={location}: {s}:{'' if s == 'pipe' else '//'} locations are read-only; "
                           f"expected a local path or a writable URL (s3://, gs://, ...)")


def _missing_package(location: str, s: str, err: Exception) -> StorageError:
    pkg = SCHEME_PACKAGES.get(s)
    if pkg is None:
        m = re.search(r"[Ii]nstall (?:the )?['\"]?([A-Za-z0-9_.\-]+)", str(err))
        pkg = m.group(1) if m else None
    if pkg is None:
        return StorageError(f"{location}: the {s}:// scheme needs a package that is not installed ({err})")
    extra = f" or pip install '{PIP_EXTRAS[pkg]}'" if pkg in PIP_EXTRAS else ""
    return StorageError(f"{location}: the {s}:// scheme needs the package {pkg}, which is not installed "
                        f"(pip install {pkg}{extra})")


@dataclass(frozen=True)
class Limits:
    """How long one request to an object store may take and how often its client tries it.

    `timeout_s` bounds connecting and each wait for the server's answer (so a server that accepts connections
    and never answers fails a request after it, instead of hanging); `attempts` is the client's own tries per
    request (1: no retries inside the client, for callers that retry whole operations themselves, so the two
    never multiply). None keeps the client's defaults. Applied to s3:// (botocore and s3fs); other schemes keep
    their defaults."""

    timeout_s: float | None = None
    attempts: int | None = None

    def options(self, s: str) -> dict:
        """fsspec storage options for scheme `s`."""
        if s not in ("s3", "s3a"):
            return {}
        config: dict = {}
        out: dict = {}
        if self.timeout_s is not None:
            config.update(connect_timeout=self.timeout_s, read_timeout=self.timeout_s)
            out["session"] = _session_without_expect_continue()
        if self.attempts is not None:
            config["retries"] = {"total_max_attempts": self.attempts, "mode": "standard"}
        if config:
            out["config_kwargs"] = config
        return out

    def configure(self, fs, s: str) -> None:
        """Set what is not a constructor option: s3fs's own retry loop around each botocore call."""
        if s in ("s3", "s3a") and self.attempts is not None:
            fs.retries = self.attempts


def _session_without_expect_continue():
    """An aiobotocore session whose uploads do not send `Expect: 100-continue`. With that header the client waits
    for the server's "100 Continue" before sending the body, and aiohttp's read timeout only starts once the body
    is sent: a server that never answers would hang an upload for ever, whatever the timeout."""
    from aiobotocore.session import AioSession
    from botocore.handlers import add_expect_header

    session = AioSession()
    session.unregister("before-call.s3", add_expect_header)
    return session


def filesystem(location: str, limits: Limits | None = None):
    """(fsspec filesystem, path inside it) for a URL; StorageError naming the package when its implementation
    is missing, or the scheme when fsspec knows no such protocol. Listings are not cached (a watcher polling a
    bucket must see new checkpoints). `limits`: request timeout and client-side attempts (see `Limits`)."""
    import fsspec

    s = scheme(location)
    check_location(location, location)
    try:
        fsspec.get_filesystem_class(s)
    except ImportError as e:
        raise _missing_package(location, s, e) from None
    except ValueError:
        raise StorageError(f"{location}: unknown URL scheme {s}:// (no fsspec implementation); expected a local "
                           f"path, file://, s3://, gs://, https://, hf:// or pipe:") from None
    options = (limits or Limits()).options(s)
    try:  # a fresh instance: fsspec's instance cache would keep one made under another environment's endpoint
        fs, path = fsspec.core.url_to_fs(location, use_listings_cache=False, skip_instance_cache=True, **options)
    except ImportError as e:
        raise _missing_package(location, s, e) from None
    except TypeError:  # an implementation without listing-cache options
        fs, path = fsspec.core.url_to_fs(location, skip_instance_cache=True, **options)
    (limits or Limits()).configure(fs, s)
    return fs, path


# ---------------------------------------------------------------------------------------------- retries


def retry(fn: Callable[[], T], *, attempts: int, what: str, backoff: float = 1.0, max_backoff: float = 30.0,
          retry_on: tuple = (Exception,), give_up_on: tuple = (), sleep: Callable[[float], None] = time.sleep,
          on_retry: Callable[[int, BaseException, float], None] | None = None) -> T:
    """fn(), tried up to `attempts` times with exponential backoff (backoff, 2 x backoff, ..., max_backoff).
    The last failure is raised as is; `give_up_on` exceptions are raised at once (e.g. a missing package)."""
    delay = backoff
    for attempt in range(1, max(1, attempts) + 1):
        try:
            return fn()
        except give_up_on:
            raise
        except retry_on as e:
            if attempt >= attempts:
                raise
            if on_retry is not None:
                on_retry(attempt, e, delay)
            sleep(delay)
            delay = min(max_backoff, delay * 2)
    raise AssertionError("unreachable")


def describe(e: BaseException) -> str:
    """One line for a storage failure (no traceback, no request headers)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, StorageError) else f"{type(e).__name__}: {text}"


# ---------------------------------------------------------------------------------------------- stores


class Store(abc.ABC):
    """A directory-like location: files addressed by '/'-separated paths relative to it.

    read_bytes / exists / size / list / write_bytes (atomic) / put_file (atomic) / get_file (atomic, local
    destination) / remove. `local` is True for local directories (then `path(rel)` is the local Path)."""

    location: str
    local = False
    read_only = False

    def url(self, rel: str = "") -> str:
        return join(self.location, rel) if rel else self.location

    def __str__(self) -> str:
        return self.location

    def _writable(self) -> None:
        if self.read_only:
            raise StorageError(f"{self.location}: {scheme(self.location)} locations are read-only")

    # reading
    @abc.abstractmethod
    def read_bytes(self, rel: str) -> bytes:
        """The file's bytes; FileNotFoundError when it is missing."""

    @abc.abstractmethod
    def exists(self, rel: str = "") -> bool:
        """Whether `rel` (a file or a directory; the store itself for "") exists."""

    @abc.abstractmethod
    def size(self, rel: str) -> int:
        """The file's size in bytes."""

    @abc.abstractmethod
    def list(self, rel: str = "") -> list[str]:
        """Names directly below `rel` (files and directories), sorted; [] when it does not exist."""

    def get_file(self, rel: str, dest: Path) -> None:
        write_atomic(dest, self.read_bytes(rel))

    # writing
    @abc.abstractmethod
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write the file so that it appears complete or not at all."""

    def put_file(self, rel: str, src: Path) -> None:
        self.write_bytes(rel, Path(src).read_bytes())

    @abc.abstractmethod
    def remove(self, rel: str, recursive: bool = False) -> None:
        """Delete the file, or the directory and everything below it with recursive=True."""

    def makedirs(self, rel: str = "") -> None:  # noqa: B027 - a default for the stores without directories
        """Create the directory (local); object stores have no directories: nothing to do."""


class LocalStore(Store):
    local = True

    def __init__(self, location: str | os.PathLike):
        self.root = local_path(location)
        self.location = str(self.root)

    def path(self, rel: str = "") -> Path:
        return self.root / rel if rel else self.root

    def url(self, rel: str = "") -> str:
        return str(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.path(rel).read_bytes()

    def exists(self, rel: str = "") -> bool:
        return self.path(rel).exists()

    def size(self, rel: str) -> int:
        return self.path(rel).stat().st_size

    def list(self, rel: str = "") -> list[str]:
        p = self.path(rel)
        return sorted(c.name for c in p.iterdir()) if p.is_dir() else []

    def get_file(self, rel: str, dest: Path) -> None:
        tmp = Path(dest).with_name(f".{Path(dest).name}.tmp-{os.getpid()}")
        try:
            shutil.copyfile(self.path(rel), tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        p = self.path(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(p, data)

    def put_file(self, rel: str, src: Path) -> None:
        p = self.path(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        try:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, p)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(p.parent)

    def remove(self, rel: str, recursive: bool = False) -> None:
        p = self.path(rel)
        if p.is_dir() and not p.is_symlink():
            if recursive:
                shutil.rmtree(p)
            else:
                p.rmdir()
        else:
            p.unlink(missing_ok=True)

    def makedirs(self, rel: str = "") -> None:
        self.path(rel).mkdir(parents=True, exist_ok=True)


class FsspecStore(Store):
    """An fsspec URL. The filesystem object is created lazily in each process (DataLoader workers fork, and an
    fsspec client's event loop does not survive a fork)."""

    def __init__(self, location: str, limits: Limits | None = None):
        self.location = str(location).rstrip("/")
        self.scheme = scheme(self.location)
        self.read_only = self.scheme in READ_ONLY_SCHEMES
        self.limits = limits or Limits()
        self._fs = None
        self._pid = None
        _ = self.fs  # a missing package or an unknown scheme is an error now, not at the first read

    @property
    def fs(self):
        if self._fs is None or self._pid != os.getpid():
            self._fs, self._root = filesystem(self.location, self.limits)
            self._root = self._root.rstrip("/")
            self._pid = os.getpid()
        return self._fs

    def _p(self, rel: str = "") -> str:
        _ = self.fs  # (re)made in this process: sets _root
        return f"{self._root}/{rel}" if rel else self._root

    def __getstate__(self):  # picklable for spawned workers: the filesystem is made again there
        return {"location": self.location, "scheme": self.scheme, "read_only": self.read_only, "limits": self.limits,
                "_fs": None, "_pid": None}

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self._p(rel))

    def exists(self, rel: str = "") -> bool:
        return bool(self.fs.exists(self._p(rel)))

    def size(self, rel: str) -> int:
        return int(self.fs.size(self._p(rel)))

    def list(self, rel: str = "") -> list[str]:
        try:
            entries = self.fs.ls(self._p(rel), detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        base = self._p(rel).rstrip("/")
        out = set()
        for e in entries:
            e = str(e).rstrip("/")
            name = e.rsplit("/", 1)[-1]
            if e != base and name:
                out.add(name)
        return sorted(out)

    def get_file(self, rel: str, dest: Path) -> None:
        dest = Path(dest)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        try:
            self.fs.get_file(self._p(rel), str(tmp))
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        self._writable()
        target = self._p(rel)
        if self.scheme in ATOMIC_PUT_SCHEMES:
            self.fs.pipe_file(target, data)
            return
        parent, name = target.rsplit("/", 1)
        tmp = f"{parent}/.{name}.tmp-{os.getpid()}"
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, target)

    def put_file(self, rel: str, src: Path) -> None:
        self._writable()
        target = self._p(rel)
        if self.scheme in ATOMIC_PUT_SCHEMES:
            self.fs.put_file(str(src), target)
            return
        parent, name = target.rsplit("/", 1)
        tmp = f"{parent}/.{name}.tmp-{os.getpid()}"
        self.fs.put_file(str(src), tmp)
        self.fs.mv(tmp, target)

    def remove(self, rel: str, recursive: bool = False) -> None:
        self._writable()
        try:
            self.fs.rm(self._p(rel), recursive=recursive)
        except FileNotFoundError:
            pass

    def makedirs(self, rel: str = "") -> None:
        if self.scheme not in ATOMIC_PUT_SCHEMES and not self.read_only:
            self.fs.makedirs(self._p(rel), exist_ok=True)

    # the few path operations `StorePath` offers
    def is_dir(self, rel: str = "") -> bool:
        return bool(self.fs.isdir(self._p(rel)))

    def is_file(self, rel: str = "") -> bool:
        return bool(self.fs.isfile(self._p(rel)))

    def open(self, rel: str = ""):
        """A binary reader that streams the file (block-wise reads)."""
        return self.fs.open(self._p(rel), "rb")

    def _rel(self, path: str) -> str:
        return str(path).rstrip("/")[len(self._root):].lstrip("/")

    def find(self, rel: str = "") -> list[str]:
        """Every file below `rel`, as sorted paths relative to the store."""
        return sorted(self._rel(p) for p in self.fs.find(self._p(rel)))

    def glob(self, pattern: str) -> list[str]:
        """The paths relative to the store that match `pattern` (fsspec glob: *, ?, [..], **), sorted."""
        return sorted(self._rel(p) for p in self.fs.glob(self._p(pattern)))


class StorePath:
    """A file or directory inside an `FsspecStore`, with the few `pathlib.Path` methods that readers of local
    files use (name, /, is_file, is_dir, stat().st_size, read_bytes, read_text, open, rglob), so one reader serves
    local paths and URLs. str() is its URL."""

    def __init__(self, store: FsspecStore, rel: str = ""):
        self.store, self.rel = store, rel.strip("/")
        self.name = (self.rel or store.location).rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.store.url(self.rel)

    def __repr__(self) -> str:
        return f"StorePath({str(self)!r})"

    def __lt__(self, other: StorePath) -> bool:
        return str(self) < str(other)

    def __truediv__(self, rel: str) -> StorePath:
        return StorePath(self.store, f"{self.rel}/{rel}" if self.rel else rel)

    def is_file(self) -> bool:
        return self.store.is_file(self.rel)

    def is_dir(self) -> bool:
        return self.store.is_dir(self.rel)

    def stat(self) -> os.stat_result:
        return os.stat_result((0, 0, 0, 0, 0, 0, self.store.size(self.rel), 0, 0, 0))

    def read_bytes(self) -> bytes:
        return self.store.read_bytes(self.rel)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def open(self, mode: str = "rb"):
        if mode != "rb":
            raise ValueError(f"{self}: StorePath opens files for reading in binary mode ('rb'), not {mode!r}")
        return self.store.open(self.rel)

    def rglob(self, pattern: str) -> list[StorePath]:
        """The files below whose name ends like `pattern` ("*.arrow"), sorted."""
        suffix = pattern.lstrip("*")
        return [StorePath(self.store, p) for p in self.store.find(self.rel) if p.endswith(suffix)]


class PipeStore(Store):
    """pipe:COMMAND, read-only: each file is the standard output of the command for its relative path."""

    read_only = True

    def __init__(self, location: str, timeout_s: float = 3600.0):
        check_location(location, location)
        self.location = str(location)
        self.template = self.location[len("pipe:"):]
        self.timeout_s = timeout_s

    def command(self, rel: str) -> str:
        quoted = shlex.quote(rel)
        if "{}" in self.template:
            return self.template.replace("{}", quoted)
        return self.template.rstrip("/") + "/" + quoted

    def url(self, rel: str = "") -> str:
        return f"pipe:{self.command(rel)}" if rel else self.location

    def read_bytes(self, rel: str) -> bytes:
        cmd = self.command(rel)
        try:
            out = subprocess.run(cmd, shell=True, capture_output=True, timeout=self.timeout_s,
                                 stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise StorageError(f"pipe:{cmd}: no end after {self.timeout_s:.0f} s") from None
        if out.returncode != 0:
            err = " ".join(out.stderr.decode("utf-8", "replace").split())[-300:]
            raise StorageError(f"pipe:{cmd}: exited with status {out.returncode}" + (f" ({err})" if err else ""))
        return out.stdout

    def exists(self, rel: str = "") -> bool:
        if not rel:
            return True
        try:
            self.read_bytes(rel)
            return True
        except StorageError:
            return False

    def size(self, rel: str) -> int:
        return len(self.read_bytes(rel))

    def list(self, rel: str = "") -> list[str]:
        raise StorageError(f"{self.location}: a pipe: location cannot be listed")

    def write_bytes(self, rel: str, data: bytes) -> None:
        self._writable()

    def remove(self, rel: str, recursive: bool = False) -> None:
        self._writable()


def open_store(location: str | os.PathLike, limits: Limits | None = None) -> Store:
    """The Store for a location (see the module doc); `limits` apply to an object store's requests."""
    location = str(location)
    s = scheme(location)
    if s == "pipe":
        return PipeStore(location)
    if s:
        return FsspecStore(location, limits)
    return LocalStore(location)


# ---------------------------------------------------------------------------------------------- caching


def cache_path(cache_dir: str | os.PathLike, location: str, rel: str) -> Path:
    """Where a local cache directory keeps file `rel` of remote `location`: one folder per location (a short
    hash, plus a readable tail of the URL), the relative path below it."""
    digest = hashlib.sha256(location.encode()).hexdigest()[:16]
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", location.split("://", 1)[-1])[-48:].strip("_") or "location"
    return local_path(str(cache_dir)) / f"{tail}-{digest}" / rel
