"""``ratplus train`` on shards in an S3 bucket, served by moto's S3 server on a free local port: the local run's
losses, exact resume after SIGKILL, one run per cache folder, and one-line errors naming the URL."""

import os
import signal
import socket

import pytest

from tests.e2e.runs import clean_env, error_lines, losses, ratplus, run, start, train_args

pytestmark = [pytest.mark.slow]

BUCKET, PREFIX = "ratplus-data", "tiny"
URL = f"s3://{BUCKET}/{PREFIX}"
STEPS = 8
VALIDATION = "validation step 8 "


@pytest.fixture(scope="module")
def s3_env(tiny_shards):
    """moto's S3 server (in a thread of this process) holding what ``prep shards`` wrote: each split's
    index.json and zstd shards, and the manifest. Returns the environment a run needs to reach it."""
    boto3 = pytest.importorskip("boto3")
    server_module = pytest.importorskip("moto.server")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"S3_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    client = boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"], aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    for folder, _, files in os.walk(tiny_shards):
        for name in files:
            if name in ("index.json", "manifest.json") or name.endswith(".zstd"):
                path = os.path.join(folder, name)
                client.upload_file(path, BUCKET, f"{PREFIX}/{os.path.relpath(path, tiny_shards)}")
    yield clean_env(**env)
    server.stop()


def _args(shards, out, *extra):
    return train_args(shards, out, f"train.train_tokens={STEPS * 1024}", *extra, val=True)


def _validation(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(VALIDATION)]


@pytest.fixture(scope="module")
def local_run(tiny_shards, tmp_path_factory):
    proc = run(ratplus(_args(tiny_shards, tmp_path_factory.mktemp("local"))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(losses(proc.stdout)) == list(range(1, STEPS + 1))
    return losses(proc.stdout), _validation(proc.stdout)


def _until_step(proc, step: int) -> str:
    """Read the run's stdout up to and including its line of ``step``."""
    printed = ""
    for line in proc.stdout:
        printed += line
        if line.startswith(f"step {step}/"):
            return printed
    raise AssertionError(f"the run ended before step {step}: {printed[-2000:]}{proc.stderr.read()[-3000:]}")


def test_remote_run_equals_the_local_run_and_its_cache_folder_serves_one_run(s3_env, local_run, tmp_path):
    """Read from s3:// with data.cache_dir: every step's losses and the validation equal the local run's.
    A second run given the same cache folder while the first holds it stops with one line naming the folder
    (the first is paused meanwhile, so that it still holds the folder), and the first goes on unharmed."""
    cache = tmp_path / "cache"
    first = start(ratplus(_args(URL, tmp_path / "first", f"data.cache_dir={cache}")), s3_env)
    printed = _until_step(first, 1)
    first.send_signal(signal.SIGSTOP)
    try:
        second = run(ratplus(_args(URL, tmp_path / "second", f"data.cache_dir={cache}")), s3_env)
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert losses(printed + out) == local_run[0]
    assert _validation(printed + out) == local_run[1]
    assert (cache / f"{BUCKET}_{PREFIX}_train" / "index.json").is_file()
    assert (cache / f"{BUCKET}_{PREFIX}_val" / "index.json").is_file()

    assert second.returncode == 2, second.stderr[-3000:]
    lines = error_lines(second.stderr)
    assert len(lines) == 1 and str(cache / f"{BUCKET}_{PREFIX}_train") in lines[0], second.stderr[-3000:]
    assert "Traceback" not in second.stderr


def test_remote_run_killed_midway_resumes_exactly(s3_env, local_run, tmp_path):
    """SIGKILL after step 3 (checkpoint at step 2), then the same command: it resumes from the bucket and its
    cache, and every step equals the local run's."""
    args = _args(URL, tmp_path / "run", f"data.cache_dir={tmp_path / 'cache'}")
    killed = start(ratplus(args), s3_env)
    printed = _until_step(killed, 3)
    killed.send_signal(signal.SIGKILL)
    printed += killed.stdout.read()
    killed.wait()
    again = run(ratplus(args), s3_env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout
    assert losses(printed + again.stdout) == local_run[0]
    assert _validation(again.stdout) == local_run[1]


def test_unreadable_remote_data_ends_in_one_line_naming_the_url(s3_env, tmp_path):
    """A bucket that does not exist, a prefix that does not exist, an endpoint that refuses the connection:
    each run stops with exit 2 and one line of ours naming the URL, no traceback."""
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    cases = {"s3://no-such-bucket/tiny": s3_env, f"s3://{BUCKET}/no-such-prefix": s3_env,
             URL: {**s3_env, "S3_ENDPOINT_URL": f"http://127.0.0.1:{closed}"}}
    procs = {url: start(ratplus(train_args(url, tmp_path / str(i), f"data.cache_dir={tmp_path / 'cache' / str(i)}")),
                        env)
             for i, (url, env) in enumerate(cases.items())}
    for url, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 2, (url, err[-3000:])
        lines = error_lines(err)
        assert len(lines) == 1 and f"{url}/train" in lines[0], (url, err[-3000:])
        assert "Traceback" not in err, (url, err[-3000:])
