"""The gRPC front door's surroundings: API key, health, reflection, stop, client-side checks, the stubs."""
from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_support import (
    CLOSE_BOUND_S,
    MODEL_INFO,
    FakeCore,
    ServerThread,
    expect_error,
    health_status,
    reflected_services,
    wait_for_health,
)
from grpc_tools import protoc

import pdserve.api
from pdserve.api import pdserve_pb2 as pb
from pdserve.errors import ConfigError, InvalidRequestError
from pdserve.router.client import (
    RemoteError,
    abort_request,
    build_request,
    generate_text,
    get_model_info,
    stream_generate,
)

API_KEY = "s3cret"


@pytest.fixture(scope="module")
def servers():
    st = ServerThread()
    yield st
    st.close()


@pytest.fixture(scope="module")
def core():
    return FakeCore()


@pytest.fixture(scope="module")
def url(servers, core):
    return servers.serve(core)[1]


@pytest.fixture(scope="module")
def auth_url(servers, core):
    return servers.serve(core, api_key=API_KEY)[1]


@pytest.mark.parametrize("key", [None, "wrong", API_KEY + "x"])
def test_a_missing_or_wrong_api_key_is_unauthenticated(auth_url, core, key):
    before = len(core.requests)
    err = expect_error(grpc.StatusCode.UNAUTHENTICATED, stream_generate, auth_url, text="hello", api_key=key)
    assert "API key" in err.details and len(core.requests) == before
    expect_error(grpc.StatusCode.UNAUTHENTICATED, get_model_info, auth_url, api_key=key)
    expect_error(grpc.StatusCode.UNAUTHENTICATED, abort_request, auth_url, "running", api_key=key)


def test_the_right_api_key_passes_and_health_and_reflection_stay_open(auth_url):
    assert generate_text(auth_url, text="hello", api_key=API_KEY).text == "Hello!"
    assert get_model_info(auth_url, api_key=API_KEY) == MODEL_INFO
    assert health_status(auth_url) == health_pb2.HealthCheckResponse.SERVING
    assert "pdserve.v1.Generation" in reflected_services(auth_url)


def test_health_follows_the_core_and_set_serving(servers):
    core = FakeCore(serving=False)
    server, url = servers.serve(core)
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    for service in ("", "pdserve.v1.Generation"):
        assert health_status(url, service) == not_serving
    core.serving = True
    for service in ("", "pdserve.v1.Generation"):
        assert wait_for_health(url, serving, service) == serving
    server.set_serving(False)  # draining: whatever the core says (from another thread, too)
    assert wait_for_health(url, not_serving) == not_serving
    server.set_serving(True)
    assert wait_for_health(url, serving) == serving
    core.serving = None  # the core's probe raises: NOT_SERVING, and health goes on following it
    assert wait_for_health(url, not_serving) == not_serving
    core.serving = True
    assert wait_for_health(url, serving) == serving


def test_reflection_describes_the_services(url):
    assert {"pdserve.v1.Generation", "grpc.health.v1.Health"} <= set(reflected_services(url))
    with grpc.insecure_channel(url) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        service = DescriptorPool(db).FindServiceByName("pdserve.v1.Generation")
        generate = service.methods_by_name["Generate"]
        assert generate.output_type.full_name == "pdserve.v1.GenerateResponse"
        assert generate.server_streaming and not generate.client_streaming


def test_stop_closes_running_requests(servers):
    core = FakeCore()
    server, url = servers.serve(core)
    stream = stream_generate(url, text="hang", request_id="at-stop")
    assert next(stream).text == "Hel"
    servers.run(server.stop(0.1))
    assert core.closed["at-stop"].wait(CLOSE_BOUND_S)
    with pytest.raises(RemoteError):
        list(stream)


def test_a_taken_port_is_a_config_error_naming_it(servers, url):
    port = int(url.rsplit(":", 1)[1])
    with pytest.raises(ConfigError, match=f"router.grpc_port: cannot listen on 127.0.0.1:{port}"):
        servers.serve(FakeCore(), port=port)


def test_client_side_checks_name_the_argument():
    with pytest.raises(InvalidRequestError, match="exactly one of text, messages, token_ids"):
        build_request(text="a", token_ids=[1])
    with pytest.raises(InvalidRequestError, match="unknown field 'temp'"):
        build_request(text="a", sampling={"temp": 0.5})
    with pytest.raises(InvalidRequestError, match=r"sampling\.max_tokens"):
        build_request(text="a", sampling={"max_tokens": -1})
    with pytest.raises(InvalidRequestError, match=r"sampling\.stop"):
        build_request(text="a", sampling={"stop": "END"})


def test_stubs_are_generated_from_the_proto(tmp_path):
    """pdserve_pb2.py describes pdserve.proto as it is (regenerate after an edit: the proto's header)."""
    out = tmp_path / "pdserve.pb"
    api = Path(pdserve.api.__file__).parent
    assert protoc.main(["protoc", f"-I{api}", f"--descriptor_set_out={out}", "pdserve.proto"]) == 0
    [compiled] = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    stubs = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    for fd in (compiled, stubs):  # newer protoc versions record json_name; the stubs' older one did not
        for message in fd.message_type:
            for field in message.field:
                field.ClearField("json_name")
    assert compiled == stubs
