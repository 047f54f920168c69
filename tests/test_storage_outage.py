"""A bucket outage, at the storage level: ``fer_ray.storage`` waits out an unreachable store with backoff, logs one
line per outage (and one when it is back), gives up past ``FER_RAY_STORAGE_RETRY_S`` with one line naming the
bucket, and never leaves half an object.

The policy runs on a fake failing filesystem with an injected clock and sleep (no real waiting); the rest goes
through ``fer_ray.testing.flaky_proxy`` in front of moto's S3 server on 127.0.0.1 (no Ray): connections refused
for a while, 2 s added to every response, and an outage past the limit.
"""

import logging
import threading
import time

import pyarrow.fs as pafs
import pytest

from fer_ray import storage as st
from fer_ray.config import ConfigError
from fer_ray.storage import Retry, Storage, StorageUnavailable, bucket_of, join_uri, retry_limit_s, unreachable
from fer_ray.testing import flaky_proxy

REFUSED = OSError("When getting information for key 'runs/x' in bucket 'b': AWS Error NETWORK_CONNECTION during "
                  "HeadObject operation: curlCode: 7, Could not connect to server")


class FakeClock:
    def __init__(self):
        self.now, self.sleeps = 1000.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


class Flaky:
    """A call that fails with ``error`` its first ``n`` times (each failure taking ``cost_s`` on the fake clock)."""

    def __init__(self, clock: FakeClock, n: int, error: OSError = REFUSED, cost_s: float = 0.0):
        self.clock, self.n, self.error, self.cost_s, self.calls = clock, n, error, cost_s, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.n:
            self.clock.now += self.cost_s
            raise self.error
        return "ok"


@pytest.fixture
def clock():
    st._OUTAGES.clear()
    yield FakeClock()
    st._OUTAGES.clear()


def outage_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fer_ray.storage"]


def test_backoff_one_line_per_outage_and_one_when_back(clock, caplog):
    retry = Retry(limit_s=60, clock=clock, sleep=clock.sleep)
    caplog.set_level(logging.WARNING, "fer_ray.storage")
    assert retry.call("s3://b", Flaky(clock, 6)) == "ok"
    assert clock.sleeps == [0.5, 1, 2, 4, 8, 8]
    lines = outage_lines(caplog)
    assert len(lines) == 2, lines
    assert lines[0].startswith("bucket s3://b unreachable, retrying for up to 60 s (FER_RAY_STORAGE_RETRY_S)")
    assert lines[1] == "bucket s3://b reachable again after 24 s"


def test_calls_during_one_outage_share_its_line(clock, caplog):
    retry = Retry(limit_s=60, clock=clock, sleep=clock.sleep)
    caplog.set_level(logging.WARNING, "fer_ray.storage")
    st._OUTAGES["s3://b"] = clock.now  # another thread of this process saw it first and logged it
    assert retry.call("s3://b", Flaky(clock, 3)) == "ok"
    assert outage_lines(caplog) == ["bucket s3://b reachable again after 4 s"]
    assert retry.call("s3://b", Flaky(clock, 0)) == "ok" and len(outage_lines(caplog)) == 1


def test_past_the_limit_one_line_naming_the_bucket(clock, caplog):
    retry = Retry(limit_s=30, clock=clock, sleep=clock.sleep)
    fn = Flaky(clock, 10**6, cost_s=6.0)  # each try takes pyarrow's own ~6 s of retries
    with pytest.raises(StorageUnavailable) as e:
        retry.call("s3://b (endpoint 127.0.0.1:9)", fn)
    msg = str(e.value)
    assert msg.startswith("bucket s3://b (endpoint 127.0.0.1:9) unreachable for 3") and "\n" not in msg
    assert "past the 30 s limit (FER_RAY_STORAGE_RETRY_S)" in msg and "Could not connect to server" in msg
    assert 30 <= clock.now - 1000 <= 30 + 6 + 8 and sum(clock.sleeps) <= 30
    assert list(st._OUTAGES) == ["s3://b (endpoint 127.0.0.1:9)"]  # still the same outage for later calls
    caplog.clear()
    with pytest.raises(StorageUnavailable):
        retry.call("s3://b (endpoint 127.0.0.1:9)", fn)
    assert not [m for m in outage_lines(caplog) if "unreachable, retrying" in m]  # no second line for it
    assert isinstance(e.value, st.StorageError)  # the CLI prints StorageError as one line, exit 2


def test_only_unreachable_errors_are_retried(clock):
    retry = Retry(limit_s=60, clock=clock, sleep=clock.sleep)
    for error in (FileNotFoundError("no such key"), PermissionError("AccessDenied"),
                  OSError("AWS Error ACCESS_DENIED during PutObject operation"), st.StorageError("x: no such file")):
        fn = Flaky(clock, 1, error)
        with pytest.raises(type(error)):
            retry.call("s3://b", fn)
        assert fn.calls == 1 and clock.sleeps == []
    for text in ("Connection refused", "curl error 56", "Couldn't connect to server", "Operation timed out",
                 "curlCode: 28, Timeout was reached", "Connection reset by peer"):
        assert unreachable(OSError(text)), text
    assert not unreachable(ValueError("Connection refused"))


def test_limit_from_env(monkeypatch):
    monkeypatch.delenv("FER_RAY_STORAGE_RETRY_S", raising=False)
    assert retry_limit_s() == 120
    monkeypatch.setenv("FER_RAY_STORAGE_RETRY_S", "7.5")
    assert retry_limit_s() == 7.5 and Retry().limit_s == 7.5
    for bad in ("soon", "-1", "inf", "nan"):
        monkeypatch.setenv("FER_RAY_STORAGE_RETRY_S", bad)
        with pytest.raises(ConfigError, match=f"FER_RAY_STORAGE_RETRY_S: expected a number of seconds >= 0, got "
                                              f"'{bad}'"):
            Storage("s3://b/x?region=us-east-1&endpoint_override=127.0.0.1:9&scheme=http")
    assert Storage("/tmp/x").retry is None  # local paths: never retried, the variable not read


def test_bucket_named_with_its_endpoint():
    assert bucket_of("s3://fer-test/runs/x?region=us-east-1&endpoint_override=127.0.0.1:9&scheme=http") == \
        "s3://fer-test (endpoint 127.0.0.1:9)"
    assert bucket_of("gs://b/p") == "gs://b"


# -- through the proxy (moto's S3 server on 127.0.0.1) ------------------------------------------------------------
def test_refused_for_a_while_then_back(s3_server, caplog, monkeypatch):
    monkeypatch.setenv("FER_RAY_STORAGE_RETRY_S", "60")
    st._OUTAGES.clear()
    caplog.set_level(logging.WARNING, "fer_ray.storage")
    with flaky_proxy(s3_server) as proxy:
        store = Storage(join_uri(proxy.uri(s3_server), "outage", "refused"))
        store.write_json("before.json", {"n": 1})
        proxy.refuse()
        threading.Timer(8.0, proxy.accept).start()  # longer than pyarrow's own retries (~6 s a call)
        t0 = time.monotonic()
        store.write_json("during.json", {"n": 2})  # waits the outage out
        assert 8.0 <= time.monotonic() - t0 < 80
        assert store.read_json("during.json") == {"n": 2} and store.read_json("before.json") == {"n": 1}
        assert store.files() == ["before.json", "during.json"]
    lines = outage_lines(caplog)
    assert len(lines) == 2 and "unreachable, retrying for up to 60 s" in lines[0], lines
    assert lines[0].startswith(f"bucket s3://fer-test (endpoint 127.0.0.1:{proxy.port}) ")
    assert lines[1].startswith(f"bucket s3://fer-test (endpoint 127.0.0.1:{proxy.port}) reachable again after ")


def test_two_seconds_on_every_response(s3_server):
    """A put with every response held 2 s: within pyarrow's and the AWS SDK's timeouts, so it simply takes longer."""
    with flaky_proxy(s3_server) as proxy:
        proxy.delay(2.0)
        store = Storage(join_uri(proxy.uri(s3_server), "outage", "slow"))
        payload = bytes(range(256)) * 256
        store.write_bytes("small.bin", payload)  # ~9 requests: dir checks, multipart create, part, complete
        assert proxy.delayed >= 3
    assert Storage(join_uri(s3_server, "outage", "slow")).read_bytes("small.bin") == payload


def test_outage_past_the_limit_leaves_no_half_object(s3_server, monkeypatch):
    monkeypatch.setenv("FER_RAY_STORAGE_RETRY_S", "3")
    st._OUTAGES.clear()
    direct = Storage(join_uri(s3_server, "outage", "limit"))
    with flaky_proxy(s3_server) as proxy:
        store = Storage(join_uri(proxy.uri(s3_server), "outage", "limit"))
        proxy.delay(1.0)  # the upload is under way (its first part's response held) when the bucket goes away
        threading.Timer(1.5, proxy.refuse).start()
        with pytest.raises(StorageUnavailable) as e:
            store.write_bytes("ckpt.pt", b"x" * (12 * 2**20))  # over pyarrow's 10 MiB part: a multipart upload
    msg = str(e.value)
    assert f"bucket s3://fer-test (endpoint 127.0.0.1:{proxy.port}) unreachable for" in msg and "\n" not in msg
    assert direct.files() == [] and direct.fs.get_file_info(direct.path("ckpt.pt")).type == pafs.FileType.NotFound
