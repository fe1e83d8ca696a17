"""Fault injection for tests, loaded only by processes whose PYTHONPATH starts with this folder.

DIST_GLM_TEST_STALL_SAVE=PATTERN: the first torch.save to a path containing PATTERN writes half of the
file's bytes, flushes and fsyncs them, leaves a `.stalled` file beside it and then sleeps, so that a test
can SIGKILL the process while that file is provably half written (a real save is too quick to hit).
DIST_GLM_TEST_STALL_NPY=PATTERN: the same for numpy.save (the tokenization cache's arrays).
DIST_GLM_TEST_READ_ONLY=DIR:NAME: output_dir turning read-only mid-run (below)."""

import io
import os
import time


def _stall_half_written(path, write_whole) -> None:
    """Write half of what `write_whole(buffer)` would write to `path`, mark it and sleep."""
    buffer = io.BytesIO()
    write_whole(buffer)
    data = buffer.getvalue()
    with open(path, "wb") as out:
        out.write(data[: len(data) // 2])
        out.flush()
        os.fsync(out.fileno())
    with open(f"{path}.stalled", "w") as marker:
        marker.write(str(len(data)))
    time.sleep(3600)


if PATTERN := os.environ.get("DIST_GLM_TEST_STALL_SAVE"):
    import torch

    _torch_save = torch.save

    def _stalling_torch_save(obj, f, *args, **kwargs):
        if not isinstance(f, (str, os.PathLike)) or PATTERN not in str(f):
            return _torch_save(obj, f, *args, **kwargs)
        _stall_half_written(f, lambda buffer: _torch_save(obj, buffer, *args, **kwargs))

    torch.save = _stalling_torch_save

if NPY_PATTERN := os.environ.get("DIST_GLM_TEST_STALL_NPY"):
    import numpy as np

    _np_save = np.save

    def _stalling_np_save(file, arr, *args, **kwargs):
        if NPY_PATTERN not in str(file):
            return _np_save(file, arr, *args, **kwargs)
        _stall_half_written(file, lambda buffer: _np_save(buffer, arr, *args, **kwargs))

    np.save = _stalling_np_save

if READ_ONLY := os.environ.get("DIST_GLM_TEST_READ_ONLY"):
    # DIR:NAME: once DIR/NAME exists (a checkpoint, say), every Python-level open of a file under DIR for
    # writing fails with EROFS, as on a filesystem remounted read-only mid-run (which the kernel refuses
    # to do while the run holds files open for writing, so a test cannot do it for real).
    import builtins
    import errno

    _dir, _, _after = READ_ONLY.partition(":")
    _open = builtins.open

    def _read_only_open(file, mode="r", *args, **kwargs):
        writes = any(c in mode for c in "wax+")
        inside = isinstance(file, (str, os.PathLike)) and os.path.abspath(file).startswith(_dir + os.sep)
        if writes and inside and os.path.exists(os.path.join(_dir, _after)):
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return _open(file, mode, *args, **kwargs)

    builtins.open = _read_only_open
