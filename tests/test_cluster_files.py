"""Every shipped cluster-launcher file passes Ray's own config validation and keeps the dashboard private."""

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

FILES = sorted(Path(__file__).parent.parent.glob("cluster*.yaml"))


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_cluster_file_validates(path):
    raw = yaml.safe_load(path.read_text())
    validate_config(prepare_config(raw))
    starts = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in starts, "dashboard/job server must not listen on all interfaces"


def test_cluster_files_exist():
    assert {p.name for p in FILES} >= {"cluster.yaml", "cluster-onprem.yaml"}


def test_cloud_cluster_writes_to_a_bucket():
    """The autoscaling cluster keeps results in S3 (no NFS), and its GPU workers get an instance profile for it."""
    text = (Path(__file__).parent.parent / "cluster.yaml").read_text()
    raw = yaml.safe_load(text)
    assert "--out s3://" in text and "nfs" not in " ".join(raw["setup_commands"]).lower()
    for name, node in raw["available_node_types"].items():
        if node["resources"].get("GPU"):
            assert node["node_config"]["IamInstanceProfile"] == {"Name": "fer-ray-s3"}, name
    assert "mount -t nfs4" in (Path(__file__).parent.parent / "cluster-onprem.yaml").read_text()
