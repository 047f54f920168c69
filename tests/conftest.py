"""Shared fixtures: one local Ray instance for the whole session, started once with explicit CPUs, and the order
and markers the suite runs in.

- ``ray_session``: the session's local Ray (2 CPUs), started on first use and kept until the end. Subprocess
  drivers (``fer-ray sweep`` as a user runs it) join it through ``RAY_ADDRESS`` (``session_env``) instead of
  starting a Ray of their own: one Ray per host, as in ``ray job submit``.
- ``no_session_ray`` (per module): for the few tests that must build their own Ray cluster
  (``ray.cluster_utils.Cluster``, the autoscaler, per-GPU-type nodes): it stops the session's Ray while they run
  (and starts it again only if a later test needs it). Those modules (``OWN_CLUSTER``) are one unit of work, run
  first on one worker while the other starts the long modules.
- Order (``pytest_collection_modifyitems``, by module, modules kept whole): the own-cluster modules (one unit of
  about six minutes: last, it ran alone while the other worker idled), the ``LONG`` modules, other modules with a
  Ray or subprocess test, then the rest. Under ``pytest -n 2 --dist loadscope
  --no-loadscope-reorder`` (``make test``) the units of work (``unit_of``: a module; the ``OWN_CLUSTER`` modules
  together, one after another on one worker; each test of a ``SPREAD`` module alone) are handed out in that
  order, so the long units start first and the short ones fill the gaps; each worker has its own session Ray.
  The units are this file's scheduler (``pytest_xdist_make_scheduler``), not ``xdist_group`` marks: pytest 9
  keeps a node's id where xdist 3.8's ``--dist loadgroup`` cannot append the group, so those marks split modules
  over workers and every module fixture ran once per worker.
- Markers: ``ray`` (starts or joins Ray), set here from the fixtures a test uses, and ``subprocess`` (runs a
  command in a child process), set by the test; ``make test-fast`` deselects both.
"""

import os

import pytest

from fer_ray.testing import S3_ENV

os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub retries when offline
# The loopback bucket's fake credentials from the start (``s3_server``): a session Ray started before the first S3
# test forwards them to its workers too (``fer_ray.cluster.FORWARDED_ENV`` at ``init_ray``), so in-process drivers
# reach the bucket from their trials and tasks whatever the order the tests run in.
os.environ.update(S3_ENV)
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # Each xdist worker computes on its share of the cores: two workers' torch at two intra-op threads each on two
    # cores spun against each other (an in-process training test took 250 s beside another worker, 37 s alone).
    # Child processes (CLI drivers, benchmark smokes) inherit it; Ray trials set their own (cpus_per_worker).
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    import torch

    torch.set_num_threads(_threads)

RAY_FIXTURES = {"ray_session", "session_env", "no_session_ray"}
"""Fixtures that start or join Ray: their tests get the ``ray`` marker."""
OWN_RAY_FIXTURES = {"no_session_ray"}
"""Fixtures of tests that stop the session's Ray for one of their own: those modules run last."""
_ITEMS: list = []


LONG = ("test_s3.py", "test_gpu_check.py", "test_fault_tolerance.py", "test_pipeline.py")
"""The longest modules (``make test``'s ``--durations``), handed out first among the Ray ones so that none of them
is the last unit of a run."""
SPREAD = {"test_bench_smoke.py"}
"""Modules whose tests are independent subprocess runs: under xdist each test is its own unit of work."""
OWN_CLUSTER = {"test_autoscaling.py", "test_local_nodes.py", "test_lost_node.py", "test_placement.py"}
"""The modules that build their own Ray cluster (``no_session_ray``): one unit of work, so that they run one after
another on one worker. Two own clusters at once on a host, each with its own placement-group cleaner and
autoscaler, have removed each other's placement groups."""


def unit_of(nodeid: str) -> str:
    """The unit of work a test belongs to under xdist: its module, ``own_cluster``, or itself (``SPREAD``)."""
    module = nodeid.split("::", 1)[0]
    name = module.rsplit("/", 1)[-1]
    return "own_cluster" if name in OWN_CLUSTER else nodeid if name in SPREAD else module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class Units(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    return Units(config, log)


def pytest_collection_modifyitems(config, items):
    rank: dict = {}
    for item in items:
        names = set(item.fixturenames)
        if RAY_FIXTURES & names:
            item.add_marker(pytest.mark.ray)
        module = item.getparent(pytest.Module)
        if OWN_RAY_FIXTURES & names and module.path.name not in OWN_CLUSTER:
            raise pytest.UsageError(f"{module.path.name} builds its own Ray cluster: add it to OWN_CLUSTER in "
                                    "tests/conftest.py")
        if module.path.name in OWN_CLUSTER:
            heavy = 0.0
        elif module.path.name in LONG:
            heavy = 0.5 + LONG.index(module.path.name) / 10
        else:
            heavy = 1 if (RAY_FIXTURES & names or item.get_closest_marker("subprocess")) else 2
        rank[module] = min(rank.get(module, 2), heavy)
    items.sort(key=lambda item: rank[item.getparent(pytest.Module)])  # stable: modules stay whole and in order
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


@pytest.fixture(scope="module")
def one_thread():
    """A module's torch single-threaded (``pytest.mark.usefixtures("one_thread")``): on shared cores, spinning
    intra-op threads make small-op models 50× slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on 127.0.0.1, fake credentials in the environment; yields
    the URI of a prefix in a fresh bucket with the endpoint in its query string, as users give it."""
    from fer_ray.testing import s3_server

    with s3_server() as uri:
        yield uri


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """After ``make test``'s run (xdist's controller; not ``make test-fast``'s ``-m``, not a single module run
    without ``-n``), the machine's speed measured now, with nothing else running
    (``fer_ray.testing.machine_reference``): the suite's wall time is read against it."""
    if (hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None)
            or config.option.markexpr or config.option.collectonly):
        return
    from fer_ray.testing import machine_reference

    try:
        ref = machine_reference()
    except Exception as e:  # noqa: BLE001 - a report line, never the run's verdict
        terminalreporter.write_line(f"machine reference after the tests: not measured ({type(e).__name__}: {e})")
        return
    terminalreporter.write_line(f"machine reference after the tests: basic_cnn fp32 step (48 px, batch 64, 1 thread) "
                                f"{ref['torch_step_ms']:.0f} ms, Python loop {ref['python_loop_ms']:.0f} ms, "
                                f"torch CPU capability {ref['cpu_capability']} (docs/development.md)")
