"""On-disk cache for small artefacts built in-project (the digits teacher and metric network; the empty MLflow
store every new study store is copied from, `srdit.runtime.store`).

Entries live in `$SRDIT_CACHE_DIR` (default `~/.cache/srdit`), named `<name>-<key>.pt`. The key hashes the source
text that produced the entry together with its settings, so editing the builder or changing a setting makes a new
entry instead of silently reusing a stale one. Files are written to a temporary name and `os.replace`d into place:
concurrent processes (e.g. Ray trials starting together) may all build, but readers only ever see a complete file,
and the last writer wins with identical content.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

ENV_VAR = "SRDIT_CACHE_DIR"


def cache_dir() -> Path:
    """The cache folder (created on demand): `$SRDIT_CACHE_DIR`, else `~/.cache/srdit`."""
    root = os.environ.get(ENV_VAR) or os.path.join(os.path.expanduser("~"), ".cache", "srdit")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_key(sources: str | Iterable[str], settings: Mapping[str, Any]) -> str:
    """First 16 hex digits of sha256(source text(s) + canonical settings JSON)."""
    if isinstance(sources, str):
        sources = [sources]
    h = hashlib.sha256()
    for text in sources:
        h.update(text.encode("utf-8"))
        h.update(b"\0")  # separator: ("ab", "c") and ("a", "bc") must not collide
    h.update(json.dumps(dict(settings), sort_keys=True, separators=(",", ":")).encode("utf-8"))
    return h.hexdigest()[:16]


def cache_path(name: str, key: str) -> Path:
    return cache_dir() / f"{name}-{key}.pt"


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then atomically replace `path`."""
    import torch

    write_atomic(path, lambda f: torch.save(obj, f))


def write_atomic(path: str | os.PathLike, write) -> None:
    """`write(binary file)` into a temporary file in the same folder, fsync, then atomically replace `path`
    (a reader sees the old file or the new one, never half of one).

    Raises OSError naming `path` (errno kept: ENOSPC for a full disk) when the operating system refuses the write,
    however the writer reported it; the temporary file is removed and `path` keeps its previous content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        failed = os_error_in(e) if isinstance(e, Exception) else None
        named = isinstance(e, OSError) and e.filename not in (None, tmp)  # the writer's own error, already named
        if failed is not None and not named:  # e.g. a full disk: torch.save wraps it in a RuntimeError, unnamed
            raise OSError(failed.errno, failed.strerror or os.strerror(failed.errno), str(path)) from e
        raise


def os_error_in(e: BaseException) -> OSError | None:
    """The operating system's error (an OSError with an errno) that `e` is, or was raised from or while handling;
    None when there is none. torch.save reports a failed write (ENOSPC: no space left on device; EDQUOT; EIO) as
    a RuntimeError of its zip writer, raised while handling the OSError of the file's `write`."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno:
            return x
        stack += [x.__cause__, x.__context__]
    return None


def load(path: str | os.PathLike) -> Any:
    """Load a cache file safely (tensors, containers and primitives only)."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def load_torch(path: str | os.PathLike, safe_globals: Iterable[Any] = ()) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU (`safe_globals`: classes allowed besides tensors) for a file
    a user names, without torch's warnings: on a plain pickle torch warns about its protocol (two lines on stderr)
    before it fails, and the caller's one-line error says what the file is. Raises what torch.load raises."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)


def cached(name: str, key: str, build: Callable[[], Any]) -> Any:
    """Return the entry `name-key`, building and storing it first when it is missing or unreadable.

    `build` must return something `torch.load(weights_only=True)` can read back (tensors, dicts, lists, str, numbers).
    """
    path = cache_path(name, key)
    if path.exists():
        try:
            return load(path)
        except Exception as e:  # truncated or foreign file: rebuild and overwrite it below
            warnings.warn(f"cache entry {path} is unreadable ({type(e).__name__}: {e}); rebuilding it", stacklevel=2)
    obj = build()
    save_atomic(obj, path)
    return obj
