"""Paths resolved under a root directory, never leading out of it.

The disk backend must not follow a symbolic link out of its root: with
``root/link -> /elsewhere``, ``save(b"x", "link/x.bin")`` must not create
``/elsewhere/x.bin``. Resolving a path first (``os.path.realpath``) and using
it afterwards leaves a window in which another process swaps a directory for a
link, so nothing here hands a path of more than one name to the kernel. A path
is walked one name at a time from a descriptor of the root, each name opened
relative to its parent's descriptor with ``O_NOFOLLOW`` -- what Linux's
``openat2(RESOLVE_BENEATH)`` does in the kernel, which Python does not offer.
A name that turns out to be a symbolic link is read (``readlinkat``) and its
target walked the same way:

* a relative target continues from the link's directory; each ``..`` goes back
  along the directories actually walked, and a ``..`` above the root is
  refused, even when the target would come back in (``../root/x``);
* an absolute target is followed when it starts with the root's path, as given
  or resolved (``os.path.realpath``), and continues from the root; any other is
  refused, even one that reaches the root through links of its own;
* more than :data:`MAX_LINKS` links in one path is a loop, and refused.

A refusal is an :class:`~polystore.errors.InvalidPathError`. Each step opens a
name through the descriptor of the directory the previous step checked, so a
swap between two steps is seen by the next one and handled by the same rules:
there is no window between check and use. (The first name is opened through
the root's own path: ``O_NOFOLLOW`` guards that last name, and the root itself
may be a link, its owner's choice.)

The last name of a path is the caller's: operations that act on a name (save
replaces it, delete removes it, move renames it) use it as it is, through
``dir_fd``; operations that read through it follow it with :meth:`Root.settle`
or :meth:`Root.open_file`.

Cost: one ``open`` and one ``close`` per directory on the path (the root is
opened only for a name right under it), a few microseconds per operation; the
figures are in ``docs/decisions.rst``. Directories are walked with ``O_PATH``
where the OS has it (Linux), which needs only search permission, as the
kernel's own lookup does. Descriptor-relative calls (``dir_fd``) are POSIX:
there are none on Windows.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from typing import NamedTuple, Self

from polystore.backends import _common as c
from polystore.errors import InvalidPathError

__all__ = [
    "MAX_LINKS",
    "READ_DIR",
    "READ_FILE",
    "Place",
    "Root",
    "copy_tree",
    "entries",
    "lexists",
    "scan_tree",
]

#: Symbolic links one path may pass through (Linux's own limit) before it counts as a loop.
MAX_LINKS = 40

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# Walking needs a directory to look names up in, not to read it.
_WALK = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
_ROOT = _WALK & ~os.O_NOFOLLOW  # the root may be a link: its owner's choice
#: Flags that open a directory for reading (listing, fsync) without following a link.
READ_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
#: Flags that open a file for reading without following a link.
READ_FILE = os.O_RDONLY | os.O_NOFOLLOW | _CLOEXEC | getattr(os, "O_BINARY", 0)
# What open() with O_NOFOLLOW says about a link: ELOOP (Linux, macOS), EMLINK
# (FreeBSD), EFTYPE (NetBSD); with O_DIRECTORY, Linux says ENOTDIR.
_MAYBE_LINK = {errno.ELOOP, errno.EMLINK, errno.ENOTDIR, getattr(errno, "EFTYPE", errno.ELOOP)}


class Place:
    """Where a path leads: ``name`` in the open directory ``fd``.

    ``parts`` is that directory's path from the root with no link in it. ``name``
    is ``"."`` when the path is the directory itself. A place owns ``fd``: close
    it, or use it as a context manager.
    """

    __slots__ = ("fd", "links", "name", "parts")

    def __init__(self, fd: int, parts: list[str], name: str, links: int = 0) -> None:
        self.fd = fd
        self.parts = parts
        self.name = name
        self.links = links  # links followed to get here, bounded by MAX_LINKS

    @property
    def path(self) -> str:
        """The normal path of ``name`` from the root, with no link in it."""
        return "/".join(self.parts if self.name == "." else [*self.parts, self.name])

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Step(NamedTuple):
    name: str
    origin: int  # which name of the caller's path this step comes from (-1: the last)
    from_link: bool  # read from a link's target, not given by the caller


class Root:
    """A root directory whose paths are resolved without leaving it.

    ``path`` is absolute and may itself be a symbolic link: that is the owner's
    choice, so it is followed (each time, as the kernel does).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._slash = path.rstrip("/") + "/"
        real = os.path.realpath(path)
        # Absolute link targets that name the root, either way, without the final "/".
        self._prefixes = tuple({p.rstrip("/") for p in (path, real)})

    def __reduce__(self) -> tuple[type[Root], tuple[str]]:
        # The resolved root belongs to the machine that unpickles.
        return Root, (self.path,)

    # -- the caller's entry points ------------------------------------------------------

    def walk(self, path: str, *, create: list[str] | None = None) -> Place:
        """The place of ``path``'s last name (not looked at), every directory
        before it resolved inside the root.

        A missing directory raises :class:`~polystore.errors.NotFoundError`; with
        ``create`` (a list), it is made, and its path appended to ``create``. A
        file on the way raises :class:`~polystore.errors.NotFoundError`, or
        :class:`~polystore.errors.NotADirectoryError` naming it with ``create``.
        """
        parts = path.split("/") if path else []
        return self._walk(parts, len(parts) - 1, path, create)

    def open_dir(self, path: str, *, create: list[str] | None = None) -> Place:
        """The directory ``path`` itself (``name == "."``), links followed inside the root.

        Like :meth:`walk`; a file at ``path`` raises
        :class:`~polystore.errors.NotADirectoryError`.
        """
        parts = path.split("/") if path else []
        return self._walk([*parts, "."], len(parts), path, create)

    def _walk(self, parts: list[str], dirs: int, shown: str, create: list[str] | None) -> Place:
        """Open the first ``dirs`` names of ``parts`` as directories; the place of
        the name after them."""
        # The common case first: directories that are directories, one plain
        # open each, the first through the root's path (which saves opening the
        # root). Anything else -- a link, a missing directory, a file -- goes to
        # _resolve, from where this stopped.
        i = 0
        try:
            fd = os.open(self._slash + parts[0], _WALK) if dirs > 0 else -1
        except OSError:
            fd = -1
        if fd < 0:
            fd = self._open_root(create is not None, shown)
        else:
            i = 1
        while i < dirs:
            try:
                child = os.open(parts[i], _WALK, dir_fd=fd)
            except OSError:
                break
            os.close(fd)
            fd = child
            i += 1
        else:
            return Place(fd, parts[:dirs], parts[dirs] if 0 <= dirs < len(parts) else ".")
        steps = [_Step(name, i + j, False) for j, name in enumerate(parts[i:])]
        if steps[-1].name == ".":  # open_dir's: it stands for the last name
            steps[-1] = _Step(".", steps[-1].origin - 1, False)
        return self._resolve(Place(fd, parts[:i], "."), steps[::-1], shown, create)

    def settle(self, place: Place, shown: str) -> tuple[Place, os.stat_result | None]:
        """Follow ``place.name`` while it is a link; return where it ends and its
        ``lstat`` (``None`` when nothing is there). Takes ``place`` over."""
        try:
            while True:
                try:
                    st = os.stat(place.name, dir_fd=place.fd, follow_symlinks=False)
                except FileNotFoundError:
                    return place, None
                if not stat.S_ISLNK(st.st_mode):
                    return place, st
                place = self.follow(place, shown)
        except BaseException:
            place.close()
            raise

    def lookup(self, path: str) -> tuple[Place, os.stat_result | None]:
        """:meth:`walk` then :meth:`settle`: where ``path`` leads, and what is there."""
        return self.settle(self.walk(path), path)

    def open_file(self, path: str, flags: int = READ_FILE) -> tuple[int, Place]:
        """Open what ``path`` leads to with ``flags`` (which hold ``O_NOFOLLOW``).

        Returns the descriptor and the place it was opened in, both the caller's.
        """
        place = self.walk(path)
        try:
            while True:
                try:
                    return os.open(place.name, flags, dir_fd=place.fd), place
                except OSError as exc:
                    if exc.errno not in _MAYBE_LINK or not _is_link(place.fd, place.name):
                        raise
                place = self.follow(place, path)
        except BaseException:
            place.close()
            raise

    def kind(self, fd: int, parts: list[str], name: str) -> int | None:
        """The file type (``stat.S_IFMT``) that link ``name`` in directory ``fd``
        (at ``parts``) leads to inside the root; ``None`` when it leads nowhere,
        out of the root, or round in a loop."""
        shown = "/".join([*parts, name])
        try:
            place, st = self.settle(self.follow(Place(os.dup(fd), parts, name), shown), shown)
        except (OSError, InvalidPathError):
            return None
        place.close()
        return None if st is None else stat.S_IFMT(st.st_mode)

    # -- the walk -----------------------------------------------------------------------

    def _open_root(self, create: bool, shown: str) -> int:
        try:
            return os.open(self.path, _ROOT)
        except FileNotFoundError:
            if not create:
                raise c.not_found(shown) from None
            os.makedirs(self.path, exist_ok=True)  # removed since the backend was opened
            return os.open(self.path, _ROOT)

    def _resolve(
        self, place: Place, pending: list[_Step], shown: str, create: list[str] | None
    ) -> Place:
        """Walk ``pending`` (a stack: the next step last) from ``place`` (taken
        over) until one name is left; return its place."""
        try:
            while pending and (len(pending) > 1 or pending[0].name in ("", ".", "..")):
                step = pending.pop()
                name = step.name
                if name in ("", "."):
                    continue
                if name == "..":
                    if not place.parts:
                        raise _outside(shown, _label(shown, step), "..")
                    # Back along the walk, from the root: only link targets hold
                    # "..", so this is rare, and no descriptor has to be kept.
                    pending.extend(_Step(n, step.origin, True) for n in reversed(place.parts[:-1]))
                    place = self._restart(place, create, shown)
                    continue
                try:
                    child = os.open(name, _WALK, dir_fd=place.fd)
                except OSError as exc:
                    place = self._not_opened(place, step, exc, pending, shown, create)
                    continue
                os.close(place.fd)
                place.fd = child
                place.parts = [*place.parts, name]
            place.name = pending.pop().name if pending else "."
            return place
        except BaseException:
            place.close()
            raise

    def _restart(self, place: Place, create: list[str] | None, shown: str) -> Place:
        links = place.links
        place.close()
        return Place(self._open_root(create is not None, shown), [], ".", links)

    def _not_opened(
        self,
        place: Place,
        step: _Step,
        exc: OSError,
        pending: list[_Step],
        shown: str,
        create: list[str] | None,
    ) -> Place:
        """Deal with a directory step whose ``open`` failed: follow a link, make a
        missing directory, or raise the caller's error."""
        name = step.name
        try:
            st = os.stat(name, dir_fd=place.fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            place.name = name
            targets, absolute = self._read_link(place, shown, _label(shown, step))
            pending.extend(_Step(n, step.origin, True) for n in reversed(targets))
            return self._restart(place, create, shown) if absolute else place
        if st is None:
            if create is None:
                raise c.not_found(shown) from None
            if step.from_link:  # a dangling link is not a directory to make
                raise c.not_a_directory(_label(shown, step)) from None
            try:
                os.mkdir(name, 0o777, dir_fd=place.fd)
            except FileExistsError:
                pass  # made meanwhile: look again
            else:
                create.append("/".join([*place.parts, name]))
            pending.append(step)
            return place
        if not stat.S_ISDIR(st.st_mode):
            label = _label(shown, step)
            if create is not None or (label == shown and step.origin >= 0):
                raise c.not_a_directory(label) from None
            raise c.not_found(shown) from None  # runs through a file
        if exc.errno in _MAYBE_LINK or exc.errno == errno.ENOENT:
            pending.append(step)  # a directory now, not when it was opened: look again
            return place
        raise exc

    def _read_link(self, place: Place, shown: str, label: str) -> tuple[list[str], bool]:
        """The names in link ``place.name``'s target and whether they start from
        the root (an absolute target) rather than the link's directory. A target
        out of the root is refused."""
        place.links += 1
        if place.links > MAX_LINKS:
            raise InvalidPathError(
                f"{shown!r}: too many levels of symbolic links (more than {MAX_LINKS})"
            )
        target = os.readlink(place.name, dir_fd=place.fd)
        if not target.startswith("/"):
            return target.split("/"), False
        rest = self._inside(target)
        if rest is None:
            raise _outside(shown, label, target)
        return rest, True

    def _inside(self, target: str) -> list[str] | None:
        for prefix in self._prefixes:
            if target == prefix or target.startswith(prefix + "/"):
                return target[len(prefix) :].split("/")
        return None

    def follow(self, place: Place, shown: str) -> Place:
        """Where link ``place.name`` leads (its last name not looked at). Takes
        ``place`` over."""
        try:
            targets, absolute = self._read_link(place, shown, shown)
            steps = [_Step(n, -1, True) for n in reversed(targets)]
            if absolute:
                place = self._restart(place, None, shown)
        except BaseException:
            place.close()
            raise
        return self._resolve(place, steps, shown, None)


def _label(shown: str, step: _Step) -> str:
    """The caller's path up to the name a step comes from."""
    if step.origin < 0:
        return shown
    return "/".join(shown.split("/")[: step.origin + 1])


def _outside(shown: str, label: str, target: str) -> InvalidPathError:
    return InvalidPathError(
        f"{shown!r} leads out of the root: {label!r} is a symbolic link to {target!r}"
    )


def _is_link(fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def lexists(place: Place) -> bool:
    """Whether anything, a dangling link included, has ``place.name``."""
    try:
        os.stat(place.name, dir_fd=place.fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


# -- trees -----------------------------------------------------------------------------------


def scan_tree(fd: int, recursive: bool) -> Iterator[tuple[int, list[str], list[os.DirEntry[str]]]]:
    """Each directory of the tree at ``fd`` (a readable directory, the caller's):
    ``(its fd, its names below the top, its entries)``, top first.

    With ``recursive``, real subdirectories are entered, links to directories
    never (no loops, nothing reached twice, nothing outside); a subdirectory
    swapped for a link meanwhile is not entered either (``O_NOFOLLOW``).
    """
    stack: list[tuple[int, list[str], list[str]]] = []
    try:
        found = entries(fd)
        yield fd, [], found
        if recursive:
            stack.append((fd, [], _subdirs(found)))
        while stack:
            top, parts, subdirs = stack[-1]
            if not subdirs:
                stack.pop()
                if top != fd:
                    os.close(top)
                continue
            name = subdirs.pop()
            try:
                child = os.open(name, READ_DIR, dir_fd=top)
            except OSError:
                continue  # gone, or no longer a directory
            stack.append((child, [*parts, name], []))
            found = entries(child)
            yield child, [*parts, name], found
            stack[-1][2].extend(_subdirs(found))
    finally:
        for top, _, _ in stack:
            if top != fd:
                os.close(top)


def entries(fd: int) -> list[os.DirEntry[str]]:
    """The entries of readable directory ``fd`` (the caller's)."""
    with os.scandir(fd) as it:
        return list(it)


def _subdirs(entries: list[os.DirEntry[str]]) -> list[str]:
    return [e.name for e in reversed(entries) if e.is_dir(follow_symlinks=False)]


def copy_tree(src: int, dst: int, skip: Callable[[str], bool]) -> None:
    """Copy the tree of directory ``src`` into the empty directory ``dst`` (both
    readable descriptors, the caller's).

    Files are copied with their mode and times (as ``shutil.copy2`` does),
    directories made with theirs, and symbolic links copied as links, never
    followed: a copy reads nothing out of the tree. Other entries (sockets,
    FIFOs, devices) and names for which ``skip`` is true are left out.
    """
    stack: list[tuple[int, int, list[os.DirEntry[str]]]] = [(src, dst, entries(src)[::-1])]
    try:
        while stack:
            s, d, todo = stack[-1]
            if not todo:
                stack.pop()
                _copy_stat(s, d)
                if s != src:
                    os.close(s)
                    os.close(d)
                continue
            entry = todo.pop()
            name = entry.name
            if skip(name):
                continue
            if entry.is_symlink():
                os.symlink(os.readlink(name, dir_fd=s), name, dir_fd=d)
            elif entry.is_dir(follow_symlinks=False):
                os.mkdir(name, 0o700, dir_fd=d)
                child_src = os.open(name, READ_DIR, dir_fd=s)
                try:
                    child_dst = os.open(name, READ_DIR, dir_fd=d)
                except BaseException:
                    os.close(child_src)
                    raise
                stack.append((child_src, child_dst, entries(child_src)[::-1]))
            elif entry.is_file(follow_symlinks=False):
                _copy_file(s, d, name)
    finally:
        for s, d, _ in stack:
            if s != src:
                os.close(s)
                os.close(d)


def _copy_file(src_dir: int, dst_dir: int, name: str) -> None:
    fd = os.open(name, READ_FILE, dir_fd=src_dir)
    with open(fd, "rb") as source:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return  # swapped for something else meanwhile
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC
        out = os.open(name, flags | getattr(os, "O_BINARY", 0), 0o600, dir_fd=dst_dir)
        with open(out, "wb") as target:
            shutil.copyfileobj(source, target)
            target.flush()
            _copy_stat_fd(st, out)


def _copy_stat(src: int, dst: int) -> None:
    _copy_stat_fd(os.fstat(src), dst)


def _copy_stat_fd(st: os.stat_result, fd: int) -> None:
    os.chmod(fd, stat.S_IMODE(st.st_mode))
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
