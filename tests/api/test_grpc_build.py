"""The gRPC stubs: compiled from protos/ by ladle.api.grpc.build, with exactly Triton's messages, field numbers and
service (what tritonclient.grpc was generated from), importable as a package."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import httpx
import pytest
import tritonclient.grpc.model_config_pb2 as triton_config
import tritonclient.grpc.service_pb2 as triton_service
from google.protobuf import descriptor_pb2

from ladle.api.grpc import build
from ladle.api.grpc.generated import grpc_service_pb2, model_config_pb2
from tests.repos import write_probe
from tests.server import LadleServer, free_port
from tests.test_packaging import absent_env


def _layout(module) -> descriptor_pb2.FileDescriptorProto:
    """A compiled file's descriptor without what does not travel on the wire (options, JSON names)."""
    proto = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(proto)
    proto.ClearField("options")

    def clean(message) -> None:
        for field in message.field:
            field.ClearField("json_name")
            field.ClearField("options")
        for nested in message.nested_type:
            clean(nested)

    for message in proto.message_type:
        clean(message)
    for service in proto.service:
        for method in service.method:
            method.ClearField("options")
    return proto


@pytest.mark.parametrize(("ours", "theirs"), [(grpc_service_pb2, triton_service), (model_config_pb2, triton_config)])
def test_layout_is_tritons(ours, theirs) -> None:
    mine, triton = _layout(ours), _layout(theirs)
    assert mine.package == triton.package == "inference"
    assert [m.name for m in mine.message_type] == [m.name for m in triton.message_type]
    assert mine == triton


def test_generate_writes_an_importable_package(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "stubs_pkg"
    build.generate(out)
    assert sorted(p.name for p in out.glob("*.py")) == sorted(
        ["__init__.py", "grpc_service_pb2.py", "grpc_service_pb2_grpc.py", "model_config_pb2.py",
         "model_config_pb2_grpc.py"])
    assert "from . import model_config_pb2" in (out / "grpc_service_pb2.py").read_text()
    assert "\nimport grpc_service_pb2" not in (out / "grpc_service_pb2_grpc.py").read_text()
    monkeypatch.syspath_prepend(str(tmp_path))
    stubs = importlib.import_module("stubs_pkg.grpc_service_pb2_grpc")
    assert hasattr(stubs, "GRPCInferenceServiceServicer")
    sys.modules.pop("stubs_pkg.grpc_service_pb2_grpc", None)


def test_missing_grpc_tools_says_how_to_generate(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "grpc_tools", None)  # as if grpcio-tools were not installed
    with pytest.raises(RuntimeError, match=r"grpcio-tools is not installed.*python -m ladle.api.grpc.build"):
        build.generate(tmp_path / "none")


def test_without_grpcio_rest_serves_and_says_grpc_is_off(tmp_path: Path) -> None:
    write_probe(tmp_path / "repo")
    with LadleServer([tmp_path / "repo", "--grpc-port", str(free_port())], env=absent_env(tmp_path, ("grpc",))) as s:
        assert httpx.get(s.url + "/v2/models/probe/ready").status_code == 200
        assert "KServe v2 over gRPC is off" in s.log() and "pip install 'ladle[grpc]'" in s.log()
