"""Streaming's shared memory on a shared host: a dataset registers its prefix beside a live job's without
touching that job's segments, stale prefixes are removed, and a cache folder in use is refused in one line."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest

from tests.data.data_helpers import write_window_folder

pytestmark = pytest.mark.skipif(not (os.path.isdir("/dev/shm") and os.path.isdir("/proc")),
                                reason="POSIX shared memory in /dev/shm and /proc (Linux)")

SHM = "/dev/shm"


def _names(prefix: int) -> set[str]:
    return {n for n in os.listdir(SHM) if n.startswith(f"{prefix:06}_")}


def _unused_prefix() -> int:
    """A prefix far above what live jobs use, with nothing of it on the host."""
    for prefix in range(900000, 999999):
        if not _names(prefix) and not os.path.exists(os.path.join(tempfile.gettempdir(),
                                                                 f"{prefix:06}_barrier_filelock")):
            return prefix
    raise AssertionError("no free prefix")


def _fake_stale(prefix: int) -> list[str]:
    """Segments and a file lock of a prefix as a killed job leaves them (nobody maps or holds them)."""
    paths = [os.path.join(SHM, f"{prefix:06}_locals"), os.path.join(SHM, f"{prefix:06}_barrier"),
             os.path.join(tempfile.gettempdir(), f"{prefix:06}_barrier_filelock")]
    for path in paths:
        with open(path, "wb") as f:
            f.write(b"\0" * 64)
    return paths


_HOLDER_JOB = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from ratplus_mega.data.streaming import build_window_dataset
    ds = build_window_dataset([{folder!r}], batch_size=4, shuffle=None)
    print(ds._shm_prefix_int, flush=True)
    sys.stdin.readline()                      # hold the dataset until told to read
    print(int(ds[5][0]), int(ds[90][0]), flush=True)
""")


def test_a_new_dataset_keeps_a_live_jobs_segments_and_removes_stale_ones(tmp_path):
    """Another job (a child process) holds a dataset; a stale prefix lies around. Registering here, and
    streaming's own cleaning entry point (which this package replaces), remove the stale prefix only; the
    job's segments stay and it still reads its samples afterwards."""
    import streaming.base.util

    from ratplus_mega.data import streaming as ours

    folder = write_window_folder(tmp_path)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    job = subprocess.Popen([sys.executable, "-c", _HOLDER_JOB.format(repo=repo, folder=folder)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        theirs = int(job.stdout.readline())
        their_segments = _names(theirs)
        assert f"{theirs:06}_locals" in their_segments
        stale = _fake_stale(_unused_prefix())

        assert streaming.base.util.clean_stale_shared_memory is ours.clean_stale_shared_memory
        streaming.base.util.clean_stale_shared_memory()
        assert not any(os.path.exists(p) for p in stale)
        stale = _fake_stale(_unused_prefix())
        mine = ours.build_window_dataset([folder], batch_size=4, shuffle=None)
        assert not any(os.path.exists(p) for p in stale)
        assert mine._shm_prefix_int != theirs
        assert _names(theirs) == their_segments

        job.stdin.write("\n")
        job.stdin.flush()
        assert job.stdout.readline().split() == ["15", "100"]  # windows 5 and 90 start with i + 10
    finally:
        job.kill()
        job.wait()


def test_a_prefix_held_through_its_holder_file_is_kept():
    """A job in another PID namespace (sharing /dev/shm) is invisible in /proc: its leader's flock on the
    prefix's holder file still marks the prefix as in use."""
    from ratplus_mega.data import streaming as ours

    prefix = _unused_prefix()
    stale = _fake_stale(prefix)
    fd = os.open(ours._holder_path(prefix), os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        ours.clean_stale_shared_memory()
        assert all(os.path.exists(p) for p in stale)
    finally:
        os.close(fd)
    ours.clean_stale_shared_memory()
    assert not any(os.path.exists(p) for p in stale)


def test_a_cache_folder_in_use_is_refused_in_one_line(tmp_path):
    """Streaming serves one cache folder to one reader: a second registration of the same remote's cache
    folder on the host stops with one line naming the folder and the remote."""
    from ratplus_mega.data import streaming as ours

    local = str(tmp_path / "cache" / "bucket_prefix_train")
    prefix, shm, holder = ours._take_prefix([local], ["s3://bucket/prefix/train"])
    try:
        with pytest.raises(ValueError) as e:
            ours._take_prefix([local], ["s3://bucket/prefix/train"])
        message = str(e.value)
        assert "\n" not in message and local in message and "s3://bucket/prefix/train" in message
        assert "data.cache_dir" in message
        other = ours._take_prefix([str(tmp_path / "elsewhere")], ["s3://bucket/prefix/train"])
        assert other[0] != prefix
        other[1].cleanup()
        os.close(other[2])
    finally:
        shm.cleanup()
        os.close(holder)
