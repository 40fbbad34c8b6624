"""Where the tool writes: one home for atomic writes and for the names of partial outputs.

Every output (a file or a folder) is first written under a temporary sibling named
`.<stem>.partial-<pid><suffix>` and renamed onto its final name only when complete, so a crash at any moment
leaves the previous output or the new one, never a half-written file under the final name. The partial name
carries the writer's process id, so the next run recognises the partials of writers that died and removes them.

An output replaces only what the tool wrote before: every output folder carries a marker file
(`.weather-restore-output.json`: command, version), and `check_output_folder` / `check_output_file` refuse,
before any work starts, a folder or file the tool did not write (unless forced) and, even when forced, an output
that would delete the input, the current folder or the home folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from weather_restore.errors import OutputError

log = logging.getLogger(__name__)

PARTIAL = ".partial-"
REPLACED = ".replaced-"  # an old output folder moved aside for a moment while the new one takes its name
MARKER_NAME = ".weather-restore-output.json"


def partial_path(final: Path, pid: int | None = None) -> Path:
    """The temporary sibling a writer with process id `pid` (default: this one) fills before renaming."""
    final = Path(final)
    return final.with_name(f".{final.stem}{PARTIAL}{os.getpid() if pid is None else pid}{final.suffix}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove(path: Path) -> None:
    """Remove a file or a folder tree; nothing when it is absent."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_partials(final: Path) -> list[Path]:
    """Remove the partial siblings of `final` left by writers that are no longer running; returns them."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    removed = []
    for kind in (PARTIAL, REPLACED):
        prefix = f".{final.stem}{kind}"
        for candidate in final.parent.glob(f"{prefix}*{final.suffix}"):
            pid = candidate.name[len(prefix) : len(candidate.name) - len(final.suffix) or None]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                remove(candidate)
                removed.append(candidate)
    return removed


def _fsync(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


@contextlib.contextmanager
def atomic_path(final: Path, fsync: bool = False, sweep: bool = True) -> Iterator[Path]:
    """Yield the partial sibling of `final` to write (a file, or a folder the caller creates); on success it is
    renamed onto `final` (a folder already at `final` is moved aside first and removed after), on any error or
    interrupt it is removed and `final` is left as it was. With `fsync`, a file is flushed to disk first.
    `sweep` first removes the partials of dead writers beside `final`; a writer of many small files inside one
    output folder turns it off (each sweep lists the folder), since the folder's own partial is swept whole."""
    final = Path(final)
    created = [folder for folder in (final.parent, *final.parent.parents) if not folder.exists()]
    final.parent.mkdir(parents=True, exist_ok=True)
    if sweep:
        remove_stale_partials(final)
    temporary = partial_path(final)
    remove(temporary)
    try:
        yield temporary
        if fsync and temporary.is_file():
            _fsync(temporary)
    except BaseException:
        remove(temporary)
        for folder in created:  # the folders made for it, innermost first: a failed output leaves no trace
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    if final.is_dir() and not final.is_symlink():  # os.replace cannot replace a non-empty folder
        if not temporary.is_dir():  # a file never replaces a folder; folder writers ask check_output_folder first
            remove(temporary)
            raise OutputError(f"{final} is a folder: refusing to replace it with a file; choose another path")
        old = final.with_name(f".{final.stem}{REPLACED}{os.getpid()}{final.suffix}")
        os.replace(final, old)
        os.replace(temporary, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temporary, final)


def atomic_write_text(path: Path, text: str, fsync: bool = False) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path, fsync=fsync) as temporary:
        temporary.write_text(text)


def atomic_write_bytes(path: Path, data: bytes, fsync: bool = False) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path, fsync=fsync) as temporary:
        temporary.write_bytes(data)


# --- What an output may replace ---------------------------------------------------------------------------------


def write_marker(folder: Path, command: str) -> Path:
    """Sign `folder` (while it is still a partial) as an output of `command`, so later runs may replace it."""
    from weather_restore import __version__

    # No time stamp: the marker sits inside outputs that DVC hashes, and a stage re-run on the same inputs must
    # give the same hash, or every stage after it reruns (and two machines' dvc.lock never agree).
    stamp = {"command": command, "version": __version__}
    path = Path(folder) / MARKER_NAME
    path.write_text(json.dumps(stamp, indent=1) + "\n")
    return path


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def marker_command(folder: Path) -> str | None:
    """The command whose marker `folder` carries, or None."""
    stamp = _read_json(Path(folder) / MARKER_NAME)
    return stamp.get("command") if stamp else None


def _within(inner: Path, outer: Path) -> bool:
    """`inner` is `outer` or lies somewhere inside it (both resolved)."""
    return inner == outer or outer in inner.parents


def _refuse_overlaps(output: Path, inputs: Iterable[Path], what: str) -> None:
    """Refusals no --force lifts: replacing `output` would delete the input, the current folder or the home."""
    real = output.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if real == source:
            raise OutputError(f"{output}: the output would overwrite the input; choose another {what}")
        if _within(source, real):
            raise OutputError(
                f"{output}: the output {what} holds the input {given}, which replacing it would delete; "
                f"choose an output outside it (--force does not change this)"
            )
    cwd = Path.cwd().resolve()
    if _within(cwd, real):
        raise OutputError(
            f"{output}: the output {what} holds the current folder {cwd}, which replacing it would delete; "
            f"choose an output inside it or elsewhere (--force does not change this)"
        )
    home = Path.home().resolve()
    if _within(home, real) or real == Path(real.anchor):
        raise OutputError(
            f"{output}: the output {what} is the home folder, the root or a parent of the home folder; "
            f"choose a folder of its own (--force does not change this)"
        )


def check_output_folder(
    folder: Path,
    command: str,
    inputs: Iterable[Path] = (),
    force: bool = False,
    own_file: tuple[str, frozenset[str]] | None = None,
) -> Path:
    """Refuse, before any work, an output folder that `command` may not replace; returns it made absolute.

    It may be replaced when it does not exist, is empty or carries the marker of an earlier run of `command`; with
    `own_file` (name, JSON keys), also when it holds that file (the index or manifest a version of the tool
    older than the marker wrote). Any other folder only with `force`. Never, even with `force`: a file or link
    in its place, an output that is the input or holds it, or holds the current folder or the home folder.
    """
    folder = Path(os.path.abspath(folder))  # `--out .` and `--out ..` get a real name to compare and replace
    _refuse_overlaps(folder, inputs, "folder")
    if not os.path.lexists(folder):
        return folder
    if folder.is_symlink() or not folder.is_dir():
        raise OutputError(
            f"{folder}: is a {'link' if folder.is_symlink() else 'file'}, not a folder {command} wrote; "
            "remove it or choose another path"
        )
    written_by = marker_command(folder)
    if not any(folder.iterdir()) or written_by == command:
        return folder
    if written_by is None and own_file is not None:
        own = _read_json(folder / own_file[0])
        if own is not None and own_file[1] <= own.keys():
            return folder
    if force:
        log.warning("%s: not written by weather-restore %s; replacing it as --force asks", folder, command)
        return folder
    why = f"was written by weather-restore {written_by}" if written_by else f"has no {MARKER_NAME}"
    raise OutputError(
        f"{folder}: exists, is not empty and is not an output of weather-restore {command} ({why}); "
        "pass --force to replace it, or choose another path"
    )


def _a(kind: str) -> str:
    return f"{'an' if kind[0].lower() in 'aeiou' else 'a'} {kind}"


def check_output_file(
    path: Path,
    kind: str,
    is_kind: Callable[[Path], bool],
    inputs: Iterable[Path] = (),
    force: bool = False,
) -> Path:
    """Refuse, before any work, a single-file output that may not be replaced; returns it made absolute.

    An existing file is replaced only when `is_kind` says it holds a `kind` (a video for a video, an image for an
    image), or with `force`. Never, even with `force`: the input itself, or a folder under the file's name.
    """
    path = Path(os.path.abspath(path))
    _refuse_overlaps(path, inputs, kind)
    if not os.path.lexists(path):
        return path
    if path.is_dir() and not path.is_symlink():
        raise OutputError(f"{path}: is a folder, which {_a(kind)} file never replaces; choose another name")
    if path.is_file() and is_kind(path):
        return path
    if force:
        log.warning("%s: not %s file; replacing it as --force asks", path, _a(kind))
        return path
    raise OutputError(f"{path}: exists and is not {_a(kind)} file; pass --force to replace it, or choose another path")
