"""Training loader, random-offset sampler and validation reader against windows written independently."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.data.data_helpers import EOS, T, WINDOWS, stream_of, read_windows, window_id, window_tokens, \
    write_window_folder
from tests.e2e.runs import free_port


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return write_window_folder(str(tmp_path_factory.mktemp("windows")))


def _cfg(folder, **kw):
    from ratplus_mega.config.schema import DataConfig

    return DataConfig(train=[folder], num_workers=0, shuffle_seed=17, **kw)


def _loader(folder, **kw):
    from ratplus_mega.data.loader import build_train_loader
    from ratplus_mega.data.streaming import DataLayout

    return build_train_loader(_cfg(folder, **kw), seq_len=T, vocab_size=1000, eos_id=EOS, layout=DataLayout(),
                              micro_batch_size=4)


def _take(loader, n: int) -> list[list[int]]:
    it = iter(loader)
    out = [[window_id(r) for r in next(it)[0].tolist()] for _ in range(n)]
    del it
    return out


def test_make_batch_masks_labels_after_eos():
    from ratplus_mega.data.loader import make_batch

    windows = torch.tensor([[5, 2, 7, 8, 2], [2, 9, 9, 2, 4]], dtype=torch.int32)
    inputs, labels = make_batch(list(windows.numpy().astype(np.uint16)), eos_id=2)
    assert inputs.dtype == labels.dtype == torch.int64 and inputs.shape == labels.shape == (2, 4)
    for b in range(2):
        for t in range(4):
            assert inputs[b, t] == windows[b, t]
            assert labels[b, t] == (-100 if windows[b, t] == 2 else windows[b, t + 1])


def test_one_rank_resume_is_exact_across_epochs(folder):
    """30 batches of 4 from 96 windows cross an epoch boundary; stopping after 10 and restoring gives the
    same 30 batches, and epoch 0 holds every window once."""
    loader = _loader(folder)
    full = _take(loader, 30)
    del loader
    gc.collect()
    first = _loader(folder)
    head = _take(first, 10)
    state = json.loads(json.dumps(first.state_dict()))
    del first
    gc.collect()
    resumed = _loader(folder)
    resumed.load_state_dict(state)
    tail = _take(resumed, 20)
    del resumed
    gc.collect()
    assert head + tail == full
    assert sorted(i for b in full[:24] for i in b) == list(range(WINDOWS))
    assert full[:24] != [list(range(i, i + 4)) for i in range(0, WINDOWS, 4)], "not shuffled"


def test_state_refuses_other_shuffle(folder):
    loader = _loader(folder)
    state = loader.state_dict()
    del loader
    gc.collect()
    other = _loader(folder, shuffle_algo="py1b")
    with pytest.raises(ValueError, match="shuffle_algo='py1e' but the config gives 'py1b'"):
        other.load_state_dict(state)
    del other
    gc.collect()


def test_manifest_mismatch_names_both_values(folder):
    from ratplus_mega.data.loader import build_train_loader
    from ratplus_mega.data.streaming import DataLayout

    manifest = os.path.join(os.path.dirname(folder), "manifest.json")
    message = f"{manifest}: shards hold windows for seq_len {T} but the model's seq_len is 32"
    with pytest.raises(ValueError, match=message):
        build_train_loader(_cfg(folder), seq_len=32, vocab_size=1000, eos_id=EOS, layout=DataLayout(),
                           micro_batch_size=4)
    with pytest.raises(ValueError, match=f"{manifest}: .*vocabulary of 1000 but the model's vocab_size is 32000"):
        build_train_loader(_cfg(folder), seq_len=T, vocab_size=32000, eos_id=EOS, layout=DataLayout(),
                           micro_batch_size=4)


def test_validation_reader_reads_each_window_once(folder):
    from ratplus_mega.data.eval_reader import build_val_reader
    from ratplus_mega.data.streaming import DataLayout

    seen = []
    for rank in range(3):
        reader = build_val_reader(folder, seq_len=T, vocab_size=1000, eos_id=EOS, batch_size=4, max_windows=50,
                                  layout=DataLayout(dp_rank=rank, dp_size=3))
        for inputs, labels in reader:
            for row_in, row_lab in zip(inputs.tolist(), labels.tolist()):
                i = window_id(row_in)
                w = window_tokens(i)
                assert row_in == w[:-1].tolist()
                assert row_lab == [-100 if a == EOS else b for a, b in zip(w[:-1], w[1:])]
                seen.append((rank, i))
        del reader
        gc.collect()
    assert [i for _, i in seen] == list(range(50))
    assert [sum(r == k for r, _ in seen) for k in range(3)] == [16, 17, 17]


def test_random_offset_slices_the_flat_stream(folder):
    from ratplus_mega.data.random_offset import build_random_offset_loader
    from ratplus_mega.data.streaming import DataLayout

    stream = stream_of(read_windows(folder))
    assert len(stream) == WINDOWS * T + 1

    def build(rank=0):
        return build_random_offset_loader(_cfg(folder), seq_len=T, vocab_size=1000, eos_id=EOS,
                                          layout=DataLayout(dp_rank=rank, dp_size=2), micro_batch_size=4)

    s = build()
    it = iter(s)
    batches = [next(it) for _ in range(5)]
    offsets = [s.offset(j) for j in range(20)]
    for j, o in enumerate(offsets):
        window = stream[o: o + T + 1]
        inputs, labels = batches[j // 4][0][j % 4], batches[j // 4][1][j % 4]
        assert inputs.tolist() == window[:-1].tolist()
        assert labels.tolist() == [-100 if a == EOS else b for a, b in zip(window[:-1], window[1:])]
    draws = np.array([s.offset(j) for j in range(3000)])
    assert draws.min() >= 0 and draws.max() <= len(stream) - (T + 1)
    assert abs(draws.mean() / (len(stream) - T - 1) - 0.5) < 0.05 and (draws % T != 0).mean() > 0.8
    state = s.state_dict()
    assert state["consumed_samples"] == 5 * 4 * 2
    del it, s
    gc.collect()
    again = build()
    again.load_state_dict(state)
    nxt = next(iter(again))
    assert nxt[0].tolist() == [stream[o: o + T].tolist() for o in [again.offset(j) for j in range(20, 24)]]
    assert [again.offset(j) for j in range(20)] == offsets
    del again
    gc.collect()
    other = build(rank=1)
    assert [other.offset(j) for j in range(20)] != offsets
    del other
    gc.collect()


def _launch(folder, out_dir, world: int, replication: int, plan: list[dict]) -> list[list[dict]]:
    """Run loader_worker.py on ``world`` ranks (gloo, CPU) and return each rank's phases."""
    worker = os.path.join(os.path.dirname(__file__), "loader_worker.py")
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, worker, folder, str(out_dir), str(replication),
                                       json.dumps(plan)], env=env, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=240)[1] for p in procs]
    for p, err in zip(procs, errors):
        assert p.returncode == 0, err[-3000:]
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_ranks_disjoint_resumable_and_resume_on_one(folder, tmp_path):
    """Two DP ranks: epoch 0 splits the windows disjointly and covers them; stopping after 7 batches and
    restoring gives the uninterrupted batches; the same state resumed on one rank sees each remaining
    window of the epoch exactly once."""
    state = str(tmp_path / "state.json")
    plan = [{"take": 16}, {"take": 7, "save": state}, {"take": 9, "load": state}]
    ranks = _launch(folder, tmp_path, world=2, replication=1, plan=plan)
    for phases in ranks:
        assert all(p["masked_ok"] for p in phases)
        assert phases[1]["batches"] + phases[2]["batches"] == phases[0]["batches"]
    assert ranks[0][1]["state"] == ranks[1][1]["state"] and ranks[0][1]["state"]["sample_in_epoch"] == 7 * 4 * 2
    epoch0 = [i for phases in ranks for b in phases[0]["batches"][:12] for i in b]
    assert sorted(epoch0) == list(range(WINDOWS))
    consumed = {i for phases in ranks for b in phases[1]["batches"] for i in b}
    (tmp_path / "one").mkdir()
    one = _launch(folder, tmp_path / "one", world=1, replication=1, plan=[{"take": 11, "load": state}])[0][0]
    rest = [i for b in one["batches"][:10] for i in b]
    assert sorted(rest + list(consumed)) == list(range(WINDOWS))
    assert one["epoch"] == 1 and set(one["batches"][10]) <= set(range(WINDOWS))


@pytest.mark.slow
@pytest.mark.multiproc
def test_one_rank_resumed_on_two_sees_the_same_global_batches(folder, tmp_path):
    """A one-rank state resumed on two DP ranks (a job that gained a node): every later global batch (the two
    ranks' micro-batches of one step) holds the samples of the one-rank run's two micro-batches of that step,
    and the epoch's windows are each seen once."""
    state = str(tmp_path / "state.json")
    one = _launch(folder, tmp_path, world=1, replication=1, plan=[{"take": 24}, {"take": 8, "save": state}])[0]
    assert one[1]["batches"] == one[0]["batches"][:8]
    (tmp_path / "two").mkdir()
    two = _launch(folder, tmp_path / "two", world=2, replication=1, plan=[{"take": 8, "load": state}])
    for step in range(8):
        expected = one[0]["batches"][8 + 2 * step] + one[0]["batches"][9 + 2 * step]
        assert sorted(two[0][0]["batches"][step] + two[1][0]["batches"][step]) == sorted(expected), step
    seen = [i for b in one[1]["batches"] for i in b] + [i for r in two for b in r[0]["batches"] for i in b]
    assert sorted(seen) == list(range(WINDOWS))


@pytest.mark.multiproc
def test_tensor_parallel_peers_get_identical_batches(folder, tmp_path):
    ranks = _launch(folder, tmp_path, world=2, replication=2, plan=[{"take": 30}])
    assert ranks[0][0]["batches"] == ranks[1][0]["batches"]
    assert sorted(i for b in ranks[0][0]["batches"][:24] for i in b) == list(range(WINDOWS))
    assert ranks[0][0]["state"]["sample_in_epoch"] == 6 * 4


def test_shard_reader_reads_what_streamings_reader_reads(folder):
    """The kept-open ``pread`` reader replaces streaming's (pinned internals) and returns the same bytes."""
    from streaming.base.format.mds.reader import MDSReader

    from ratplus_mega.data.streaming import _PreadMDSReader, build_window_dataset

    ds = build_window_dataset([folder], batch_size=4, shuffle=None)
    assert len(ds.shards) > 1 and all(type(s) is _PreadMDSReader for s in ds.shards)
    for i in range(ds.num_samples):
        ds[i]  # streaming decompresses the shard on first access
        shard_id, row = ds.spanner[i]
        shard = ds.shards[shard_id]
        assert shard.get_sample_data(row) == MDSReader.get_sample_data(shard, row)


def test_open_shard_files_are_bounded(tmp_path):
    from ratplus_mega.data.streaming import _OpenShards

    paths = []
    for k in range(3):
        paths.append(str(tmp_path / f"s{k}"))
        open(paths[-1], "wb").close()
    files = _OpenShards(limit=2)
    first = files.fd(paths[0])
    files.fd(paths[1])
    assert files.fd(paths[0]) == first  # reused, and now the most recent
    files.fd(paths[2])
    assert list(files.fds) == [paths[0], paths[2]]
    with pytest.raises(FileNotFoundError):
        files.fd(str(tmp_path / "missing"))
