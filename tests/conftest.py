"""Shared fixtures: one local Ray instance for the whole session, started with explicit CPUs."""

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub retries when offline


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from fer_ray.train import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on 127.0.0.1, fake credentials in the environment; yields
    the URI of a prefix in a fresh bucket with the endpoint in its query string, as users give it."""
    from fer_ray.testing import s3_server

    with s3_server() as uri:
        yield uri
