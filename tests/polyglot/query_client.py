"""A Python caller generated from the proto alone: queries the running service, watches the answer to its
completion, checks a recipient in one call (live, then cached, then live again after an invalidation), and checks
the error contract.

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

        check_capability(pb, stub)
    print("python client ok:", answer.request_id)


def check_capability(pb, stub) -> None:
    """CheckCapability as a new user would call it, against the sandbox: the last digit of an identity decides its
    status (0-3 full, 4-5 partial, 6-8 no capability). Identities of their own: the cache is the process's."""
    from google.protobuf.duration_pb2 import Duration

    expected = [  # (channel, identity, status) in request order
        (pb.CHANNEL_RCS, "46713330004", pb.CAPABILITY_STATUS_PARTIAL),
        (pb.CHANNEL_SMS, "46713330006", pb.CAPABILITY_STATUS_NO_CAPABILITY),
        (pb.CHANNEL_WHATSAPP, "46713330001", pb.CAPABILITY_STATUS_FULL),
        (pb.CHANNEL_VIBERBM, "46713330002", pb.CAPABILITY_STATUS_FULL),
    ]
    recipient = pb.Recipient(identified_by=pb.IdentifiedBy(channel_identities=[
        pb.ChannelIdentity(channel=channel, identity=identity) for channel, identity, _ in expected]))
    # Full before partial; within a group VIBERBM, then WHATSAPP (as preferred), then the channels not listed.
    recommended = [(pb.CHANNEL_VIBERBM, "46713330002"), (pb.CHANNEL_WHATSAPP, "46713330001"),
                   (pb.CHANNEL_RCS, "46713330004")]
    request = pb.CheckCapabilityRequest(app_id="python-app", recipient=recipient, wait=Duration(seconds=5),
                                        channel_preference=[pb.CHANNEL_VIBERBM, pb.CHANNEL_WHATSAPP])

    def check(source):
        answer = stub.CheckCapability(request, timeout=15)
        assert answer.complete, answer
        assert list(answer.pending) == [], answer
        got = [(r.notification.channel, r.notification.identity, r.notification.capability_status)
               for r in answer.results]
        assert got == expected, (got, answer)
        for result in answer.results:
            assert result.source == source, (pb.ResultSource.Name(result.source), answer)
            assert result.checked_at.seconds > 0, result
            assert result.notification.request_id, result
            if result.notification.capability_status == pb.CAPABILITY_STATUS_PARTIAL:
                assert list(result.notification.channel_capabilities) == ["TEXT", "MEDIA"], result
        assert [(i.channel, i.identity) for i in answer.recommended] == recommended, answer
        return answer

    live = check(pb.RESULT_SOURCE_LIVE)
    assert live.request_id, live
    assert {r.notification.request_id for r in live.results} == {live.request_id}, live

    cached = check(pb.RESULT_SOURCE_CACHE)
    assert cached.request_id == "", cached
    assert {r.notification.request_id for r in cached.results} == {live.request_id}, cached

    removed = stub.InvalidateCapability(pb.InvalidateCapabilityRequest(app_id="python-app", recipient=recipient),
                                        timeout=10).removed
    assert removed == len(expected), removed
    again = check(pb.RESULT_SOURCE_LIVE)
    assert again.request_id and again.request_id != live.request_id, (again.request_id, live.request_id)

    def invalid(call, request, field):
        try:
            call(request, timeout=10)
            raise AssertionError(f"accepted: {request}")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
            assert field in e.details(), e.details()

    invalid(stub.CheckCapability, pb.CheckCapabilityRequest(
        app_id="python-app", recipient=recipient, max_age=Duration(seconds=-1)), "max_age")
    invalid(stub.InvalidateCapability, pb.InvalidateCapabilityRequest(app_id="python-app"), "recipient")


if __name__ == "__main__":
    main()
