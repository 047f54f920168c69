"""Shared fixtures: one local Ray instance for the whole session, started with explicit CPUs."""

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub retries when offline


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from fer_ray.cluster import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture
def no_session_ray():
    """Pause the session's Ray while a test's subprocesses start their own: with two Ray instances on one host,
    Ray Train's placement-group cleaner cannot tell which is its own (README, "One local Ray per host")."""
    import ray

    from fer_ray import cluster

    was_running = ray.is_initialized()
    ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
    yield
    if was_running:
        cluster.init_ray(num_cpus=2)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on 127.0.0.1, fake credentials in the environment; yields
    the URI of a prefix in a fresh bucket with the endpoint in its query string, as users give it."""
    from fer_ray.testing import s3_server

    with s3_server() as uri:
        yield uri
