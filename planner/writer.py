"""Write a generated project into a folder without ever losing a file peftplan did not write.

The principles, each enforced here and nowhere else:

- **Only our files.** The manifest `.peftplan_files` lists every file peftplan wrote, with its sha256.
  Regenerating (`--force`) replaces or deletes a file only if the manifest lists it *and* its content is still
  what peftplan wrote; anything else in the folder is never read, moved or walked. A folder that is not empty and
  has no manifest is not a peftplan project: it is refused, with or without `--force` (so `-o /` or `-o ~` ends
  at once, without a single directory listing beyond its first entry).
- **No check-then-act.** The folder is claimed with `mkdir` (or, when it exists, under an exclusive lock on
  `.peftplan.lock`); every file is placed with `link()`, which fails if anything appeared at that name
  meanwhile, and a file of ours is first renamed aside and only then verified, so a file edited in between is
  detected and put back, not overwritten.
- **Interrupted generations are visible.** Files are built in a staging folder inside the project and placed one
  by one; the manifest says `pending` until the last one is in place. The runtime refuses a pending project,
  and the next `generate` completes it (or restores what a crash left aside).
- Paths are never globbed: names with `*`, `?` or `[` are just names.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST = ".peftplan_files"
LOCK = ".peftplan.lock"
RUN_LOCK = "outputs/.peftplan-run.lock"  # held by a training run (runtime/lock.py)
STAGING_PREFIX = ".peftplan-staging-"
PENDING, COMPLETE = "# peftplan manifest: pending", "# peftplan manifest: complete"
MAX_OWN_FILE = 8 * 2**20  # no file peftplan writes is this large: a bigger one was replaced by someone


class GenerateError(Exception):
    """The project could not be written (permissions, disk full): nothing of it is left behind."""


class ConflictError(Exception):
    """The folder holds files peftplan did not write, where it would write: nothing was changed."""

    def __init__(self, out: Path, problems: list[str]):
        self.out, self.problems = out, problems
        super().__init__(f"{out}: " + "; ".join(problems))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the manifest ----------------------------------------------------------------------------------
@dataclass
class Manifest:
    files: dict[str, set[str]] = field(default_factory=dict)  # relative path -> sha256 values that are ours
    pending: bool = False
    legacy: bool = False  # written by peftplan < 0.2: paths without hashes

    def render(self, pending: bool) -> str:
        lines = [PENDING if pending else COMPLETE]
        for rel in sorted(self.files):
            lines += [f"{h}  {rel}" for h in sorted(self.files[rel])]
        return "\n".join(lines) + "\n"


def _safe_rel(rel: str) -> bool:
    parts = Path(rel).parts
    return bool(parts) and not Path(rel).is_absolute() and ".." not in parts and rel == str(Path(*parts)) \
        and not rel.startswith(STAGING_PREFIX) and rel not in (MANIFEST, LOCK)


def read_manifest(out: Path) -> Manifest | None:
    """The manifest of `out`, None when there is none; ConflictError when it is not one peftplan could have
    written (a symlink, too large, not UTF-8, or a path that leaves the folder)."""
    path = out / MANIFEST
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > 2**20:
        raise ConflictError(out, [f"{MANIFEST} is not a manifest peftplan wrote (not a small regular file)"])
    try:
        text = _read_nofollow(path).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConflictError(out, [f"{MANIFEST} is unreadable ({exc})"]) from None
    m = Manifest()
    lines = text.splitlines()
    if lines and lines[0].startswith("# peftplan manifest:"):
        m.pending = lines.pop(0) == PENDING
    else:
        m.legacy = True  # one path per line, no hashes
    for line in lines:
        if not line.strip():
            continue
        digest, sep, rel = ("", "", line.strip()) if m.legacy else line.partition("  ")
        if not m.legacy and (not sep or len(digest) != 64):  # a hashed manifest never turns into a legacy one
            raise ConflictError(out, [f"{MANIFEST} has a line that is not '<sha256>  <path>': {line.strip()[:80]!r}; "
                                      "it was edited, so which files are ours is unknown: nothing was changed"])
        if not _safe_rel(rel):
            raise ConflictError(out, [f"{MANIFEST} lists {rel!r}, which is not a file of a project"])
        m.files.setdefault(rel, set()).add(digest)
    return m


def _read_nofollow(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read(MAX_OWN_FILE + 1)
    finally:
        os.close(fd)


def is_ours(path: Path, digests: set[str]) -> bool:
    """A regular file (not a link) whose content has one of `digests` (any content, for a legacy manifest)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_OWN_FILE:
        return False
    if digests == {""}:
        return True
    try:
        return sha256(_read_nofollow(path)) in digests
    except OSError:
        return False


# --- claiming the folder ---------------------------------------------------------------------------
def _foreign_entry(d: Path) -> str | None:
    """The first name in `d` that is not what an interrupted first generate leaves (its lock, its staging
    folders), or None. Stops at the first such name: a large folder is never listed."""
    with os.scandir(d) as it:
        for entry in it:
            if entry.name != LOCK and not entry.name.startswith(STAGING_PREFIX):
                return entry.name
    return None


def _current_digests(out: Path, manifest: Manifest) -> dict[str, set[str]]:
    """The manifest's files and hashes; for a legacy manifest (no hashes), the hash of each listed regular file
    as it is now (peftplan < 0.2 wrote them; it cannot tell an edit from the original)."""
    if not manifest.legacy:
        return manifest.files
    out_files = {}
    for rel in manifest.files:
        try:
            st = os.lstat(out / rel)
            if stat.S_ISREG(st.st_mode) and st.st_size <= MAX_OWN_FILE:
                out_files[rel] = {sha256(_read_nofollow(out / rel))}
        except OSError:
            continue
    return out_files


def _lock(out: Path, create: bool):
    """An exclusive, non-blocking lock on `out/.peftplan.lock`; released when the process ends."""
    import fcntl

    flags = os.O_RDWR | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
    fd = os.open(out / LOCK, flags, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ConflictError(out, ["another peftplan generate is writing this folder right now"]) from None
    return fd


def run_in_progress(out: Path) -> bool:
    """True while a training run holds the project's run lock."""
    import fcntl

    try:
        fd = os.open(out / RUN_LOCK, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


@dataclass
class _Placement:
    """What one generation changed, to undo it if a later step fails."""

    placed: list[tuple[Path, int]] = field(default_factory=list)  # new files: path, inode
    aside: list[tuple[Path, Path]] = field(default_factory=list)  # our old files: where they were, where they are
    dirs: list[Path] = field(default_factory=list)  # directories created
    manifest: str | None = None  # the previous manifest, restored when the generation is undone
    manifest_replaced: bool = False


def _link_noclobber(src: Path, dst: Path) -> None:
    """Make `dst` the file `src`, failing (FileExistsError) if anything exists at `dst`."""
    try:
        os.link(src, dst)
        return
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, stat.S_IMODE(os.lstat(src).st_mode))
    with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:  # no hard links here: copy, still no-clobber
        shutil.copyfileobj(inp, out)


def _makedirs(out: Path, rel_dir: Path, undo: _Placement) -> None:
    here = out
    for part in rel_dir.parts:
        here = here / part
        try:
            os.mkdir(here)
            undo.dirs.append(here)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(here).st_mode):  # a link or a file where a folder of ours belongs
                raise ConflictError(out, [f"{here.relative_to(out)} is not a folder peftplan made"]) from None


def write_project(files: dict[str, str], out: Path, force: bool, executable: set[str] = frozenset()) -> list[str]:
    """Write `files` (relative path -> text) into `out`. Returns the relative paths written.

    Raises ConflictError (the user's input: exit 2) when the folder holds files that are not ours where ours
    go, or is not a project; GenerateError (exit 1) when the file system refuses (permissions, disk full)."""
    out = Path(os.path.abspath(os.path.expanduser(out)))
    created = False
    try:
        if os.path.lexists(out) and not out.is_dir():
            raise ConflictError(out, ["exists and is not a directory"])
        os.makedirs(out.parent, exist_ok=True)
        try:
            os.mkdir(out)
            created = True
        except FileExistsError:
            if not out.is_dir():
                raise ConflictError(out, ["exists and is not a directory"]) from None
        manifest = read_manifest(out)
        if manifest is None and not created and (foreign := _foreign_entry(out)) is not None:
            raise ConflictError(out, [f"is not empty ({foreign!r} …) and is not a peftplan project (no {MANIFEST}): "
                                      "refusing to write into it, with or without --force; choose a new or empty "
                                      "folder"])
        if manifest is not None and not manifest.pending and not force:
            raise ConflictError(out, ["already exists; use --force to regenerate (your own files there are kept)"])
        lock_fd = _lock(out, create=True)
    except ConflictError:
        if created:
            _rmdir_quiet(out)
        raise
    except OSError as exc:
        if created:
            _rmdir_quiet(out)
        raise GenerateError(f"cannot write to {out}: {exc.strerror or exc}; nothing was changed") from None
    try:
        return _write_locked(files, out, force, executable, created)
    finally:
        os.close(lock_fd)


def _write_locked(files, out: Path, force: bool, executable, created: bool) -> list[str]:
    manifest = read_manifest(out)  # again, under the lock
    if manifest is None and _foreign_entry(out) is not None:
        raise ConflictError(out, ["files appeared in the folder while it was being claimed; nothing was written"])
    if manifest is not None and run_in_progress(out):
        raise ConflictError(out, ["a training run is in progress in this project; wait for it or stop it first"])
    old = _current_digests(out, manifest) if manifest else {}
    _recover_staging(out, old)
    conflicts = _conflicts(out, files, old)
    if conflicts:
        raise ConflictError(out, conflicts)
    undo = _Placement(manifest=Manifest(old).render(pending=False) if manifest else None)
    staging = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
        _stage(staging, files, executable)
        _place(out, staging, files, old, undo)
    except (ConflictError, OSError) as exc:
        _undo(out, undo)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
            staging = None
        if created:
            _remove_created(out)
        if isinstance(exc, ConflictError):
            raise
        raise GenerateError(f"could not write the project to {out}: {exc.strerror or exc}; nothing was "
                            "changed") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return sorted(files)


def _stage(staging: Path, files: dict[str, str], executable) -> None:
    """Every file written in full under `staging/new`, with its mode, before anything in the project changes."""
    (staging / ".pid").write_text(str(os.getpid()))
    mask = _umask()
    for rel, text in files.items():
        path = staging / "new" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
        path.chmod((0o777 if Path(rel).name in executable else 0o666) & ~mask)


def _place(out: Path, staging: Path, files: dict[str, str], old: dict[str, set[str]], undo: _Placement) -> None:
    """Move the staged files into place: the manifest marked pending first (old ∪ new digests), each file linked
    without clobbering, our old versions moved aside, files no longer generated removed, the manifest completed."""
    new = {rel: {sha256(text.encode("utf-8"))} for rel, text in files.items()}
    union = Manifest({rel: old.get(rel, set()) | new.get(rel, set()) for rel in {*old, *new}})
    _replace_manifest(out, staging, union.render(pending=True))
    undo.manifest_replaced = True
    for rel in sorted(files):
        _makedirs(out, Path(rel).parent, undo)
        target = out / rel
        if rel in old and os.path.lexists(target):
            _move_aside(out, staging, rel, old[rel], undo)
        try:
            _link_noclobber(staging / "new" / rel, target)
        except FileExistsError:
            raise ConflictError(out, [f"{rel} appeared while the project was being written; nothing was "
                                      "changed"]) from None
        undo.placed.append((target, os.lstat(target).st_ino))
    for rel in sorted(set(old) - set(files)):  # generated before, not any more (e.g. ds_config.json)
        if os.path.lexists(out / rel):
            try:
                _move_aside(out, staging, rel, old[rel], undo)
            except ConflictError:
                continue  # edited since: it is the user's now, left in place
    _replace_manifest(out, staging, Manifest(new).render(pending=False))


def _conflicts(out: Path, files: dict[str, str], old: dict[str, set[str]]) -> list[str]:
    """Every place where writing `files` (and removing what is no longer generated) would touch a file that is
    not ours. Checked up front so that the user sees them all; placement re-checks each one atomically."""
    found = []
    for rel in sorted(files):
        target = out / rel
        here = out
        for part in Path(rel).parent.parts:
            here = here / part
            if os.path.lexists(here) and not stat.S_ISDIR(os.lstat(here).st_mode):
                found.append(f"{here.relative_to(out)} is not a folder peftplan made")
                break
        else:
            if not os.path.lexists(target):
                continue
            if rel not in old:
                found.append(f"{rel} is not a file peftplan wrote (move it away, or generate into another folder)")
            elif not is_ours(target, old[rel]):
                found.append(f"{rel} was changed since peftplan wrote it (move your version away to regenerate)")
    return list(dict.fromkeys(found))


def _move_aside(out: Path, staging: Path, rel: str, digests: set[str], undo: _Placement) -> None:
    """Rename our old file into the staging folder, then check it is still ours (no check-then-act: once renamed,
    nobody else edits it there). If it is not, put it back and stop."""
    aside = staging / "old" / rel
    aside.parent.mkdir(parents=True, exist_ok=True)
    os.rename(out / rel, aside)
    if not is_ours(aside, digests):
        _link_noclobber(aside, out / rel)
        os.unlink(aside)
        raise ConflictError(out, [f"{rel} was changed since peftplan wrote it (move your version away to regenerate)"])
    undo.aside.append((out / rel, aside))


def _undo(out: Path, undo: _Placement) -> None:
    if undo.manifest is not None and undo.manifest_replaced:
        tmp = out / f"{MANIFEST}.restore"
        try:
            tmp.write_text(undo.manifest, encoding="utf-8")
            os.replace(tmp, out / MANIFEST)
        except OSError:  # a full disk: the pending manifest stays (it lists both versions as ours)
            tmp.unlink(missing_ok=True)
    for path, inode in reversed(undo.placed):
        try:
            if os.lstat(path).st_ino == inode:
                os.unlink(path)
        except OSError:
            pass
    for where, aside in reversed(undo.aside):
        try:
            _link_noclobber(aside, where)
        except OSError:
            pass
    for d in reversed(undo.dirs):
        _rmdir_quiet(d)


def _replace_manifest(out: Path, staging: Path, text: str) -> None:
    tmp = staging / MANIFEST
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out / MANIFEST)


def _recover_staging(out: Path, old: dict[str, set[str]]) -> None:
    """Staging folders of a generate that was killed: put back any old file it had moved aside (if its place is
    free), then remove them. Only folders with our marker are touched."""
    with os.scandir(out) as it:
        stale = [Path(e.path) for e in it if e.name.startswith(STAGING_PREFIX) and e.is_dir(follow_symlinks=False)]
    for staging in stale:
        if not (staging / ".pid").is_file():
            _rmdir_quiet(staging)  # killed right after creating it: empty
            continue
        aside_root = staging / "old"
        kept = False
        if aside_root.is_dir():
            for path in sorted(p for p in aside_root.rglob("*") if p.is_file()):
                rel = str(path.relative_to(aside_root))
                try:
                    _link_noclobber(path, out / rel)
                except FileExistsError:
                    if not (rel in old and is_ours(path, old[rel])):
                        kept = True  # not provably ours and its place is taken: keep it where it is
                except OSError:
                    kept = True
        if not kept:
            shutil.rmtree(staging, ignore_errors=True)


def _remove_created(out: Path) -> None:
    """Remove a folder this generation created, with what it wrote there (lock, manifest)."""
    for name in (MANIFEST, LOCK):
        try:
            os.unlink(out / name)
        except OSError:
            pass
    _rmdir_quiet(out)


def _rmdir_quiet(d: Path) -> None:
    try:
        os.rmdir(d)
    except OSError:
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
