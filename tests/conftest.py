"""Shared fixtures: one local Ray instance for the whole session, started once with explicit CPUs, and the order
and markers the suite runs in.

- ``ray_session``: the session's local Ray (2 CPUs), started on first use and kept until the end. Subprocess
  drivers (``fer-ray sweep`` as a user runs it) join it through ``RAY_ADDRESS`` (``session_env``) instead of
  starting a Ray of their own: one Ray per host, as in ``ray job submit``.
- ``no_session_ray`` (per module): for the few tests that must build their own Ray cluster
  (``ray.cluster_utils.Cluster``, the autoscaler): it stops the session's Ray, since with two Ray instances on one
  host Ray Train's placement-group cleaner cannot tell which is its own. Those tests run last
  (``pytest_collection_modifyitems``), so the session's Ray is started again only when a later test needs it.
- Markers: ``ray`` (starts or joins Ray), set here from the fixtures a test uses, and ``subprocess`` (runs a
  command in a child process), set by the test; ``make test-fast`` deselects both.
"""

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub retries when offline

RAY_FIXTURES = {"ray_session", "session_env", "no_session_ray"}
"""Fixtures that start or join Ray: their tests get the ``ray`` marker."""
OWN_RAY_FIXTURES = {"no_session_ray"}
"""Fixtures of tests that stop the session's Ray for one of their own: those tests run last."""
_ITEMS: list = []


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.ray)
    # Stable sort: the tests that stop the session's Ray go after every test that uses it.
    items.sort(key=lambda item: bool(OWN_RAY_FIXTURES & set(item.fixturenames)))
    _ITEMS[:] = items


def _start_session_ray():
    from fer_ray.cluster import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray(num_cpus=2)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        _start_session_ray()
    yield ray
    if ray.is_initialized():
        ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture
def session_env(ray_session) -> dict[str, str]:
    """The environment for a subprocess driver that joins the session's Ray (``RAY_ADDRESS``), as a job would."""
    return dict(os.environ) | {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}


@pytest.fixture(scope="module")
def no_session_ray(request):
    """Stop the session's Ray while a module's tests build their own Ray cluster (see the module docstring); start
    it again afterwards only if a later test of this run uses it."""
    import ray

    was_running = ray.is_initialized()
    ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
    yield
    mine = [i for i, item in enumerate(_ITEMS) if item.getparent(pytest.Module) is request.node]
    later = _ITEMS[mine[-1] + 1:] if mine else []
    if was_running and any((RAY_FIXTURES - OWN_RAY_FIXTURES) & set(item.fixturenames) for item in later):
        _start_session_ray()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on 127.0.0.1, fake credentials in the environment; yields
    the URI of a prefix in a fresh bucket with the endpoint in its query string, as users give it."""
    from fer_ray.testing import s3_server

    with s3_server() as uri:
        yield uri
