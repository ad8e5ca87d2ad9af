"""A Python caller generated from the proto alone: queries the running service, watches the answer to its
completion, and checks the error contract.

Usage: query_client.py PROTO_ROOT ADDRESS
"""
import sys
import tempfile

import grpc
from grpc_tools import protoc


def generate(proto_root: str, out: str) -> None:
    import grpc_tools

    include = grpc_tools.__path__[0] + "/_proto"
    code = protoc.main(["protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={out}",
                        f"--grpc_python_out={out}", "capability/v1/capability_service.proto"])
    assert code == 0, "protoc failed"
    sys.path.insert(0, out)


def main() -> None:
    proto_root, address = sys.argv[1], sys.argv[2]
    generate(proto_root, tempfile.mkdtemp())
    from capability.v1 import capability_service_pb2 as pb
    from capability.v1 import capability_service_pb2_grpc as rpc

    with grpc.insecure_channel(address) as channel:
        stub = rpc.CapabilityServiceStub(channel)
        answer = stub.QueryCapability(pb.QueryCapabilityRequest(
            app_id="python-app",
            recipient=pb.Recipient(identified_by=pb.IdentifiedBy(channel_identities=[
                pb.ChannelIdentity(channel=pb.CHANNEL_WHATSAPP, identity="46712312312")])),
        ), timeout=10)
        assert len(answer.request_id) == 26, answer
        assert answer.recipient.identified_by.channel_identities[0].channel == pb.CHANNEL_WHATSAPP

        seen, completion = [], None
        for message in stub.WatchCapability(pb.WatchCapabilityRequest(request_id=answer.request_id), timeout=20):
            event = message.WhichOneof("event")
            if event == "notification":
                seen.append((message.notification.offset, message.notification.capability_status))
            elif event == "completion":
                completion = message.completion
        assert seen == [(1, pb.CAPABILITY_STATUS_FULL)], seen
        assert completion.reason == pb.COMPLETION_REASON_ALL_CHANNELS_REPORTED, completion

        try:
            stub.QueryCapability(pb.QueryCapabilityRequest(recipient=pb.Recipient(contact_id="c")), timeout=10)
            raise AssertionError("a request without app_id was accepted")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
            assert "app_id" in e.details(), e.details()
    print("python client ok:", answer.request_id)


if __name__ == "__main__":
    main()
