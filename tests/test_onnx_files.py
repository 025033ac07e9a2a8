"""An exported ONNX file depends on the model only, not on where the repository is checked out:
the same run in two clones must give the same file, and so the same bento tag."""

from __future__ import annotations

import sys

import torch

from components.model import NetConfig, build_model
from components.onnx_files import export_graph
from tests.conftest import REPO_ROOT


def test_an_exported_file_holds_no_path_of_this_checkout_or_its_interpreter(tmp_path):
    torch.manual_seed(0)
    net = build_model(NetConfig("cnn", (1, 8, 8), 3, (4,), (8,), 0.0, False, "relu"))
    export_graph(net, (1, 8, 8), tmp_path / "a.onnx")
    data = (tmp_path / "a.onnx").read_bytes()
    for path in (str(REPO_ROOT), sys.prefix, "site-packages", "model.py"):
        assert path.encode() not in data, path
    export_graph(net, (1, 8, 8), tmp_path / "b.onnx")
    assert (tmp_path / "b.onnx").read_bytes() == data  # and the export is deterministic
