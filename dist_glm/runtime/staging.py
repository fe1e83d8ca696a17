"""How every writer of a directory stays safe: it stages into a fresh, uniquely named sibling it made
itself (mkdtemp), and swaps the result in only when complete, so an interrupted write never looks
finished, and it never deletes a path it did not create. A fixed staging name (`<target>.tmp`) is what
once let export delete its own input, or an unrelated directory of that name."""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def staging_dir(target: Path) -> Path:
    """A new empty directory beside `target` (same filesystem, so the final rename is atomic), hidden and
    named after it; nobody else can own it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.staging-"))


def swap_in(staged: Path, target: Path) -> None:
    """Rename `staged` to `target`. An existing `target` (its caller has checked the user asked to replace
    it) is first renamed aside into a fresh directory of ours, so that at every moment one of the two is
    whole, and only then removed."""
    if not target.exists():
        staged.rename(target)
        return
    aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.replaced-"))
    target.rename(aside / target.name)
    staged.rename(target)
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def staged(target: Path):
    """`with staged(out) as tmp:` write into tmp; on success it becomes `out` (see swap_in), on any error
    the staging directory, and nothing else, is removed."""
    tmp = staging_dir(target)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # made above, by us
        raise
    swap_in(tmp, target)


def unique_temp_file(target: Path) -> Path:
    """A fresh file name beside `target` for a write that is renamed onto it when complete; never an
    existing file's name."""
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(name, 0o644)  # mkstemp's 0600 would carry over to the renamed file
    return Path(name)


def as_umask_allows(directory: Path) -> None:
    """transformers 5 writes model.safetensors with mode 0600 (a temporary file renamed into place), so a
    model a serving engine or a colleague should read is private; give its files the mode the user's umask
    gives any new file."""
    umask = os.umask(0)
    os.umask(umask)
    for f in directory.iterdir():
        if f.is_file() and f.stat().st_mode & 0o777 == 0o600:
            f.chmod(0o666 & ~umask)
