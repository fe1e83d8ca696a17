"""Fault injection for tests, loaded only by processes whose PYTHONPATH starts with this folder.

DIST_GLM_TEST_STALL_SAVE=PATTERN: the first torch.save to a path containing PATTERN writes half of the
file's bytes, flushes and fsyncs them, leaves a `.stalled` file beside it and then sleeps, so that a test
can SIGKILL the process while that file is provably half written (a real save is too quick to hit)."""

import os

PATTERN = os.environ.get("DIST_GLM_TEST_STALL_SAVE")

if PATTERN:
    import io
    import time

    import torch

    _save = torch.save

    def _stalling_save(obj, f, *args, **kwargs):
        if not isinstance(f, (str, os.PathLike)) or PATTERN not in str(f):
            return _save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        _save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        with open(f, "wb") as out:
            out.write(data[: len(data) // 2])
            out.flush()
            os.fsync(out.fileno())
        with open(f"{f}.stalled", "w") as marker:
            marker.write(str(len(data)))
        time.sleep(3600)

    torch.save = _stalling_save
