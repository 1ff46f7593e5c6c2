"""Several jobs on one host: runs started without a launcher take their own port, and a two-node torchrun job
with both nodes on one host reads its data as a one-node job does (streaming's shared memory is registered
per node under a host lock, and only what no live process holds is cleaned)."""

import pytest

from tests.e2e.runs import clean_env, free_port, losses, numbers, ratplus, run, start, torchrun, train_args

pytestmark = [pytest.mark.slow]


def test_two_runs_started_at_once_without_a_port_each_equal_their_solo_run(tiny_shards, tmp_path):
    """No MASTER_PORT anywhere (a fixed default made the second run die with EADDRINUSE). The runs differ in
    seed, shuffle and loader workers, so that each one's losses are its own."""
    variants = {"a": train_args(tiny_shards, tmp_path / "solo-a"),
                "b": train_args(tiny_shards, tmp_path / "solo-b", "train.seed=3", "data.shuffle_seed=11",
                                "data.num_workers=1")}
    env = clean_env()
    assert "MASTER_PORT" not in env
    solo = {}
    for name, args in variants.items():
        proc = run(ratplus(args), env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        solo[name] = losses(proc.stdout)
        assert sorted(solo[name]) == [1, 2, 3, 4]
    assert solo["a"] != solo["b"]
    procs = {name: start(ratplus([a.replace("solo-", "together-") for a in args]), env)
             for name, args in variants.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (name, err[-3000:])
        assert losses(out) == solo[name], name


@pytest.mark.multiproc
def test_two_nodes_on_one_host_equal_one_node_with_two_processes(tiny_shards, tmp_path):
    """``torchrun --nnodes 2`` with both nodes on this host, started at once: each node's leader registers its
    own streaming prefix (before, both took the same one and the job died on ``NNNNNN_locals``); the losses
    equal those of one node with two processes."""
    args = train_args(tiny_shards, tmp_path / "one-node", "data.num_workers=1")
    one = run(torchrun(args, port=free_port(), nproc=2))
    assert one.returncode == 0, one.stderr[-3000:]
    expected = losses(one.stdout)
    assert sorted(expected) == [1, 2, 3, 4]

    args = train_args(tiny_shards, tmp_path / "two-nodes", "data.num_workers=1")
    port = free_port()
    nodes = [start(torchrun(args, port=port, nnodes=2, node_rank=rank)) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for rank, (node, (_, err)) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, (rank, err[-3000:])
    got = losses(outputs[0][0])
    assert sorted(got) == sorted(expected)
    for step, text in expected.items():
        assert numbers(got[step]) == pytest.approx(numbers(text), abs=2e-4), step
