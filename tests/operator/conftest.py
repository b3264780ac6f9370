"""Operator tests: the helper modules beside this file import by their plain names
(emulated_cluster, operator_harness, dbj_examples); none is named `conftest` so that
no other test folder's conftest can shadow them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from emulated_cluster import EmulatedCluster  # noqa: E402  (importable only from the line above on)
from operator_harness import Cluster, OperatorProcess  # noqa: E402


@pytest.fixture(scope="module")
def emulated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatedCluster]:
    """One emulated API for a test module (a module may start its own instead), with the
    shipped CRD, whose schema admits every job as on a cluster."""
    cluster = EmulatedCluster(tmp_path_factory.mktemp("cluster")).start()
    cluster.install_crd()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def operator(emulated: EmulatedCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """The real operator process against that API, for a test module."""
    process = OperatorProcess(emulated, tmp_path_factory.mktemp("operator")).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def cluster(emulated: EmulatedCluster, operator: OperatorProcess) -> Cluster:
    """The test's side of the API, with the operator running: the test plays the kubelet."""
    return Cluster(emulated)
