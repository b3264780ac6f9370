"""Operator tests: the helper modules beside this file import by their plain names
(emulated_cluster, operator_harness, dbj_examples); none is named `conftest` so that
no other test folder's conftest can shadow them."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
