"""MosaicML ``StreamingDataset`` over ``prep shards`` output: pinned shuffle, mixtures, model-parallel replication.

Streaming takes its rank from ``RANK``/``WORLD_SIZE`` (docs/parallelism.md, "Data under model parallelism"). With
``replication = tp * cp`` and each DP replica a block of consecutive ranks (PP = 1, megatron's rank order),
streaming gives the peers of a replica bitwise-identical samples and counts its world in DP ranks.

Several jobs (or several nodes of one job) on one host: streaming names its shared memory ``NNNNNN_<name>``
with a prefix number that each node's leader picks, and its ``clean_stale_shared_memory()`` unlinks every
prefix on the host, a running job's included. Here a node's leader picks and registers its prefix under a
host-wide lock, removing on the way only the prefixes that no live process holds, and hands the number to
the other ranks of its node through torch.distributed's store (see :func:`_register_prefix`).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import re
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import streaming.base.dataset as _streaming_dataset
import streaming.base.util as _streaming_util
import torch.distributed as dist
from streaming import Stream, StreamingDataset
from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, LOCALS, SHM_TO_CLEAN
from streaming.base.format.mds.reader import MDSReader
from streaming.base.shared import SharedMemory
from streaming.base.shared.prefix import _check_self, _pack_locals, _unpack_locals
from streaming.base.world import World

__all__ = ["DataLayout", "ShuffleParams", "WindowDataset", "build_window_dataset", "is_remote", "window_length"]


def is_remote(path: str) -> bool:
    return "://" in path


@dataclass(frozen=True, kw_only=True)
class DataLayout:
    """Where this process sits among the readers: its data-parallel rank and size, and how many consecutive
    global ranks (TP x CP peers) share each DP replica's batches."""

    dp_rank: int = 0
    dp_size: int = 1
    replication: int = 1

    def __post_init__(self):
        if not 0 <= self.dp_rank < self.dp_size or self.replication < 1:
            raise ValueError(f"bad data layout: dp_rank {self.dp_rank}, dp_size {self.dp_size}, "
                             f"replication {self.replication}")

    def check_environment(self) -> None:
        """Raise ValueError unless RANK/WORLD_SIZE place this process in DP replica ``dp_rank`` of ``dp_size``
        blocks of ``replication`` consecutive ranks: the only layout streaming's ``replication`` serves."""
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if world != self.dp_size * self.replication or rank // self.replication != self.dp_rank:
            raise ValueError(
                f"data layout dp_rank={self.dp_rank} dp_size={self.dp_size} replication={self.replication} does "
                f"not match RANK={rank} WORLD_SIZE={world}: streaming replication needs each DP replica to be "
                "a block of consecutive ranks (pipeline_parallel=1, megatron rank order)")


@dataclass(frozen=True, kw_only=True)
class ShuffleParams:
    """The shuffle, pinned: the order must not depend on the first run's node count (docs/decisions.md, "Data")."""

    seed: int
    algo: str = "py1e"
    num_canonical_nodes: int = 1


class _OpenShards:
    """The most recently read shard files, kept open (a bounded number: datasets have thousands of shards)."""

    def __init__(self, limit: int = 64):
        self.limit, self.fds = limit, OrderedDict()

    def fd(self, path: str) -> int:
        fd = self.fds.get(path)
        if fd is None:
            fd = self.fds[path] = os.open(path, os.O_RDONLY)  # FileNotFoundError: streaming fetches the shard
            if len(self.fds) > self.limit:
                os.close(self.fds.popitem(last=False)[1])
        else:
            self.fds.move_to_end(path)
        return fd


_OPEN_SHARDS = _OpenShards()


class _PreadMDSReader(MDSReader):
    """streaming's MDS shard reader with the sample read as two ``pread`` calls on a kept-open file, instead of
    open, two seeks, two reads and close per sample (the loader's largest cost). Shards never change once
    written, so a file kept open after streaming evicts and re-fetches it still holds the same bytes; ``pread``
    has no file offset, so forked loader workers may share the descriptors."""

    def get_sample_data(self, idx: int) -> bytes:
        fd = _OPEN_SHARDS.fd(os.path.join(self.dirname, self.split, self.raw_data.basename))
        begin, end = np.frombuffer(os.pread(fd, 8, (1 + idx) * 4), np.uint32)
        data = os.pread(fd, int(end - begin), int(begin))
        if not data:
            raise IndexError(f"sample {idx} is not in {self.raw_data.basename}")
        return data


class WindowDataset(StreamingDataset):
    """Samples are the ``tokens`` windows as ``np.ndarray`` of shape (T + 1,), uint16 or uint32.

    Its shared-memory prefix is registered by :func:`_register_prefix` instead of streaming's
    ``get_shm_prefix`` (safe beside other jobs and beside other nodes of this job on the same host)."""

    def __init__(self, **kwargs):
        self._prefix_holder: int | None = None

        def register(streams_local, streams_remote, world, retry=100):
            prefix, shm, self._prefix_holder = _register_prefix(streams_local, streams_remote, world)
            return prefix, shm

        original = _streaming_dataset.get_shm_prefix
        _streaming_dataset.get_shm_prefix = register
        try:
            super().__init__(**kwargs)
        finally:
            _streaming_dataset.get_shm_prefix = original
        for shard in self.shards:
            if type(shard) is MDSReader:
                shard.__class__ = _PreadMDSReader

    def __del__(self) -> None:
        super().__del__()
        if getattr(self, "_prefix_holder", None) is not None:
            os.close(self._prefix_holder)
            self._prefix_holder = None

    def __getstate__(self):  # a descriptor means nothing in another process (spawned loader workers)
        return {**self.__dict__, "_prefix_holder": None}

    def get_item(self, idx: int) -> np.ndarray:
        return super().get_item(idx)["tokens"]


def window_length(dataset: StreamingDataset) -> int:
    """T + 1 of the windows, read from the shards' column encoding (``ndarray:<dtype>:<T+1>``).

    Raises ValueError when a shard does not hold fixed-length ``tokens`` windows."""
    lengths = set()
    for shard in dataset.shards:
        encodings = dict(zip(shard.column_names, shard.column_encodings))
        enc = encodings.get("tokens", "")
        parts = enc.split(":")
        if len(parts) != 3 or parts[0] != "ndarray":
            raise ValueError(f"{shard.dirname}: shards hold no fixed-length 'tokens' windows (got {enc!r}); "
                             "write them with `ratplus prep shards`")
        lengths.add(int(parts[2]))
    if len(lengths) != 1:
        raise ValueError(f"datasets mix window lengths {sorted(lengths)}: all must be written with one --seq-len")
    return lengths.pop()


def _local_for(path: str, cache_dir: str | None) -> dict[str, Any]:
    if not is_remote(path):
        return {"local": path}
    if not cache_dir:
        raise ValueError(f"{path} is remote: set data.cache_dir to a local folder to cache it in")
    name = path.split("://", 1)[1].strip("/").replace("/", "_")
    return {"remote": path, "local": os.path.join(cache_dir, name)}


def build_window_dataset(folders: list[str], *, batch_size: int, shuffle: ShuffleParams | None,
                         weights: list[float] | None = None, replication: int = 1,
                         cache_dir: str | None = None) -> WindowDataset:
    """A :class:`WindowDataset` over MDS folders (local paths or remote URLs).

    ``weights`` become ``Stream(proportion=w / sum(weights))``; None reads each folder once per epoch.
    ``shuffle`` None keeps the stored order (random access and the random-offset sampler). ``batch_size``
    is the per-rank micro-batch size (streaming needs it for deterministic resumption)."""
    if not folders:
        raise ValueError("no datasets given (data.train is empty)")
    total = sum(weights) if weights else None
    streams = [Stream(**_local_for(f, cache_dir), proportion=(w / total if total else None))
               for f, w in zip(folders, weights or [None] * len(folders))]
    kwargs: dict[str, Any] = {"shuffle": False}
    if shuffle is not None:
        kwargs = {"shuffle": True, "shuffle_seed": shuffle.seed, "shuffle_algo": shuffle.algo,
                  "num_canonical_nodes": shuffle.num_canonical_nodes}
    else:
        kwargs["num_canonical_nodes"] = 1
    try:
        return WindowDataset(streams=streams, batch_size=batch_size,
                             replication=replication if replication > 1 else None, **kwargs)
    except Exception as e:
        remote = [f for f, stream in zip(folders, streams) if stream.remote is not None
                  and not os.path.exists(os.path.join(stream.local, "index.json"))]
        if remote and _from_remote_client(e):
            raise _remote_error(e, remote[0]) from e  # streams load in order: the first without its index failed
        raise


def _from_remote_client(e: BaseException) -> bool:
    """An error raised by an object store's client library (botocore, google, azure, ...), not by us."""
    return type(e).__module__.split(".")[0] in ("botocore", "boto3", "s3transfer", "google", "azure", "oci",
                                                   "paramiko", "urllib3", "requests")


def _remote_error(e: BaseException, url: str) -> ValueError:
    """One line naming ``url`` for a failure to read its ``index.json``."""
    endpoint = os.environ.get("S3_ENDPOINT_URL") if url.startswith("s3://") else None
    where = f" at {endpoint} (S3_ENDPOINT_URL)" if endpoint else ""
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NoSuchBucket"):
            return ValueError(f"{url}: no MDS dataset there{where}: {url.rstrip('/')}/index.json does not exist "
                              "(check the bucket and the prefix)")
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return ValueError(f"{url}: access denied{where} (error {code}): check the credentials "
                              "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")
        return ValueError(f"{url}: the object store{where} answered error {code or type(e).__name__} while "
                          f"reading {url.rstrip('/')}/index.json")
    name = type(e).__name__
    if "Connect" in name or "Timeout" in name:
        return ValueError(f"{url}: cannot connect to the object store{where or ' (S3_ENDPOINT_URL not set)'} "
                          f"({name}); check the endpoint and the network")
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return ValueError(f"{url}: cannot read it{where} ({name}: {first})")


# Streaming's shared memory on a shared host ------------------------------------------------------------------
#
# A prefix is in use while a live process holds it: its node leader keeps a shared flock on the prefix's
# holder file (inherited by forked loader workers; seen across PID namespaces that share /dev/shm), or some
# process maps one of its segments (jobs that registered through streaming itself). Everything else under
# streaming's names (segments in /dev/shm, file locks in the temporary folder) is left over by dead jobs.

_SHM_DIR = "/dev/shm"
_SEGMENT = re.compile(r"^(\d{6})_(" + "|".join(map(re.escape, SHM_TO_CLEAN)) + r")$")
_FILELOCK = re.compile(r"^(\d{6})_(" + "|".join(map(re.escape, (BARRIER_FILELOCK, CACHE_FILELOCK))) + r")$")
_HOLDER = re.compile(r"^ratplus-streaming-(\d{6})\.holder$")
_MAPPED = re.compile(rb"/dev/shm/(\d{6})_")
_registrations = itertools.count()


def _supported() -> bool:
    return os.path.isdir(_SHM_DIR) and os.path.isdir("/proc")


@contextlib.contextmanager
def _host_lock():
    """Exclusive per-host lock around finding, cleaning and registering prefixes (never held across a
    collective call: other jobs' leaders wait only for local file work)."""
    fd = os.open(os.path.join(_SHM_DIR, "ratplus-streaming.lock"), os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _holder_path(prefix: int) -> str:
    return os.path.join(_SHM_DIR, f"ratplus-streaming-{prefix:06}.holder")


def _mapped_prefixes() -> set[int]:
    """Prefixes of which some process this one can see maps a segment (unlinked segments included)."""
    prefixes = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/maps", "rb") as f:
                    prefixes.update(int(m) for m in _MAPPED.findall(f.read()))
            except OSError:  # gone, or another user's (whose segments we may not unlink either)
                pass
    return prefixes


def _holder_locked(prefix: int) -> bool:
    try:
        fd = os.open(_holder_path(prefix), os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: treat as held
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _names_by_prefix(folder: str, pattern: re.Pattern) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    try:
        names = os.listdir(folder)
    except OSError:
        return found
    for name in names:
        if m := pattern.match(name):
            found.setdefault(int(m.group(1)), []).append(name)
    return found


def _clean_stale() -> set[int]:
    """Remove the segments and file locks of every prefix no live process holds; returns the prefixes in use
    (held, or not removable by this user). Call under :func:`_host_lock`."""
    segments = _names_by_prefix(_SHM_DIR, _SEGMENT)
    filelocks = _names_by_prefix(tempfile.gettempdir(), _FILELOCK)
    holders = _names_by_prefix(_SHM_DIR, _HOLDER)
    mapped = _mapped_prefixes()
    in_use = set()
    for prefix in sorted(set(segments) | set(filelocks) | set(holders) | mapped):
        if prefix in mapped or _holder_locked(prefix):
            in_use.add(prefix)
            continue
        for folder, names in ((_SHM_DIR, segments.get(prefix, [])),
                              (tempfile.gettempdir(), filelocks.get(prefix, []))):
            for name in names:
                try:
                    os.unlink(os.path.join(folder, name))
                except FileNotFoundError:
                    pass
                except OSError:  # another user's: not ours to remove, and its prefix stays taken
                    in_use.add(prefix)
    return in_use


def clean_stale_shared_memory() -> None:
    """Remove the streaming shared memory and file locks that no live process holds, on local rank 0 (under
    the host lock), then a barrier when torch.distributed is initialized: call it on every rank.

    Replaces ``streaming.base.util.clean_stale_shared_memory`` (which unlinks every streaming segment on the
    host, a running job's included) for every caller in this process."""
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and _supported():
        with _host_lock():
            _clean_stale()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


_streaming_util.clean_stale_shared_memory = clean_stale_shared_memory


def _cache_in_use_error(local: str, remote: str) -> ValueError:
    return ValueError(
        f"data.cache_dir: {local} (the cache of {remote}) is in use by another running job on this host, or by "
        "another node of this job on the same host; streaming serves one cache folder to one reader at a time: "
        "give this run its own data.cache_dir")


def _take_prefix(streams_local: list[str], streams_remote: list[str | None]) -> tuple[int, SharedMemory, int]:
    """Under the host lock: clean stale prefixes, refuse a cache folder that a live job reads, take the
    lowest free prefix, register our locals in its ``locals`` segment and hold its holder file."""
    with _host_lock():
        in_use = _clean_stale()
        for prefix in sorted(in_use):
            try:
                with open(os.path.join(_SHM_DIR, f"{prefix:06}_{LOCALS}"), "rb") as f:
                    theirs, _ = _unpack_locals(f.read())
            except (OSError, ValueError, UnicodeDecodeError):
                continue
            for local, remote in zip(streams_local, streams_remote):
                if remote is not None and local in theirs:
                    raise _cache_in_use_error(local, remote)
        prefix = next(p for p in itertools.count() if p not in in_use)
        holder = os.open(_holder_path(prefix), os.O_RDONLY | os.O_CREAT, 0o644)
        fcntl.flock(holder, fcntl.LOCK_SH)
        data = _pack_locals(streams_local, prefix)
        shm = SharedMemory(f"{prefix:06}_{LOCALS}", True, len(data))
        shm.buf[:len(data)] = data
    return prefix, shm, holder


def _register_prefix(streams_local: list[str], streams_remote: list[str | None],
                     world: World) -> tuple[int, SharedMemory, int | None]:
    """Streaming's ``get_shm_prefix``, safe on a shared host: each node's leader takes a prefix with
    :func:`_take_prefix` and publishes it (or its error) in torch.distributed's store under a key of its
    node and of this process's count of registrations; the node's other ranks read it there and attach.
    Returns the prefix, the ``locals`` segment and the holder file descriptor (leaders) or None."""
    _check_self(streams_local)
    if not _supported():
        from streaming.base.shared import get_shm_prefix

        return (*get_shm_prefix(streams_local, streams_remote, world), None)
    count = next(_registrations)
    store = dist.distributed_c10d._get_default_store() if dist.is_available() and dist.is_initialized() else None
    key = f"ratplus-streaming/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{count}/{world.node}"
    if world.is_local_leader:
        try:
            prefix, shm, holder = _take_prefix(streams_local, streams_remote)
        except Exception as e:  # the node's other ranks wait for the answer: give them the error
            if store is not None:
                store.set(key, "error " + (str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"))
            raise
        if store is not None:
            store.set(key, str(prefix))
        return prefix, shm, holder
    if store is None:
        raise RuntimeError("streaming: a rank that is not its node's leader needs torch.distributed initialized")
    answer = store.get(key).decode()
    if answer.startswith("error "):
        raise ValueError(f"this node's streaming leader (local rank 0) failed: {answer[len('error '):]}")
    prefix = int(answer)
    shm = SharedMemory(f"{prefix:06}_{LOCALS}", False)
    theirs, their_prefix = _unpack_locals(bytes(shm.buf))
    if theirs != streams_local or their_prefix != prefix:
        raise RuntimeError(f"streaming prefix {prefix}: this node's leader registered {theirs}, this rank reads "
                           f"{streams_local} (every rank must read the same datasets)")
    return prefix, shm, None
