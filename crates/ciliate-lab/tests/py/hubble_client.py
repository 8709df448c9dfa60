"""A Hubble client generated at test time from the project's protos
(grpcio-tools), run against a live observer: prints what it read as one
JSON object for the Rust test to check.

usage: hubble_client.py PROTO_DIR OUT_DIR SOCKET
"""

import json
import subprocess
import sys


def main():
    proto_dir, out_dir, socket = sys.argv[1:4]
    files = ["flow/flow.proto", "observer/observer.proto", "relay/relay.proto", "peer/peer.proto"]
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", proto_dir,
         "--python_out", out_dir, "--grpc_python_out", out_dir, *files],
        check=True,
    )
    sys.path.insert(0, out_dir)
    import grpc
    from flow import flow_pb2
    from observer import observer_pb2, observer_pb2_grpc

    # As grpcurl, gRPC's C core sends an authority for a unix socket that
    # the server's HTTP/2 stack refuses; say "localhost" (as grpc-go does).
    channel = grpc.insecure_channel(
        "unix://" + socket, options=[("grpc.default_authority", "localhost")])
    stub = observer_pb2_grpc.ObserverStub(channel)
    status = stub.ServerStatus(observer_pb2.ServerStatusRequest(), timeout=10)
    req = observer_pb2.GetFlowsRequest(
        number=20,
        whitelist=[flow_pb2.FlowFilter(verdict=[flow_pb2.DROPPED],
                                       drop_reason_desc=[flow_pb2.POLICY_DENIED])],
    )
    drops = []
    for resp in stub.GetFlows(req, timeout=10):
        if resp.HasField("flow"):
            f = resp.flow
            drops.append({
                "verdict": flow_pb2.Verdict.Name(f.verdict),
                "reason": flow_pb2.DropReason.Name(f.drop_reason_desc),
                "src_pod": f.source.pod_name,
                "src_identity": f.source.identity,
                "dst_pod": f.destination.pod_name,
                "dst_identity": f.destination.identity,
                "node": f.node_name,
                "direction": flow_pb2.TrafficDirection.Name(f.traffic_direction),
                "icmp_type": f.l4.ICMPv4.type if f.l4.HasField("ICMPv4") else None,
                "time_ns": f.time.seconds * 10**9 + f.time.nanos,
            })
    bad = None
    try:
        bad_req = observer_pb2.GetFlowsRequest(
            whitelist=[flow_pb2.FlowFilter(http_path=["("])])
        list(stub.GetFlows(bad_req, timeout=10))
    except grpc.RpcError as e:
        bad = e.code().name
    print(json.dumps({
        "num_flows": status.num_flows,
        "max_flows": status.max_flows,
        "version": status.version,
        "drops": drops,
        "bad_filter": bad,
    }))


if __name__ == "__main__":
    main()
