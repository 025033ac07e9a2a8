"""An exported ONNX file depends on the model only, not on where the repository is checked out:
the same run in two clones must give the same file, and so the same bento tag. Its one input is
``inputs``; a file with the input's old name, ``images``, is refused saying so."""

from __future__ import annotations

import sys

import pytest
import torch

from components.model import NetConfig, build_model
from components.onnx_files import INPUT_NAME, export_graph, open_session
from components.stage import StageError
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


def test_an_exported_file_takes_inputs_and_one_with_the_old_name_is_refused(tmp_path):
    import onnx

    from components.bento_card import check_model

    torch.manual_seed(0)
    net = build_model(NetConfig("cnn", (1, 8, 8), 3, (4,), (8,), 0.0, False, "relu"))
    export_graph(net, (1, 8, 8), tmp_path / "new.onnx")
    assert INPUT_NAME == "inputs"
    assert [i.name for i in open_session(tmp_path / "new.onnx").get_inputs()] == ["inputs"]
    old = onnx.load(str(tmp_path / "new.onnx"))  # the same file, as exported before the rename
    for node in old.graph.node:
        node.input[:] = ["images" if name == "inputs" else name for name in node.input]
    old.graph.input[0].name = "images"
    onnx.save(old, str(tmp_path / "old.onnx"))
    said = r"old\.onnx names its input 'images', as models exported before it was renamed 'inputs'"
    with pytest.raises(StageError, match=said):
        open_session(tmp_path / "old.onnx")
    with pytest.raises(StageError, match=said):
        check_model(tmp_path / "old.onnx", (1, 8, 8), 3)


def test_the_exporters_function_registry_is_built_once_per_process(tmp_path):
    """torch rebuilds its ONNX function registry on every export (0.75 s): ours keeps the
    first one, and a second export gives the same file as the first."""
    from torch.onnx._internal.exporter._registration import ONNXRegistry

    torch.manual_seed(0)
    net = build_model(NetConfig("cnn", (1, 8, 8), 3, (4,), (8,), 0.0, False, "relu"))
    export_graph(net, (1, 8, 8), tmp_path / "a.onnx")
    first = ONNXRegistry.from_torchlib()
    export_graph(net, (1, 8, 8), tmp_path / "b.onnx")
    assert ONNXRegistry.from_torchlib() is first
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
