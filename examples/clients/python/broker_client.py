"""A box-token-broker client in Python (grpcio).

Gets the Service Account's token, then a token downscoped to one file, and
prints what it got as one JSON object (never the tokens themselves: they
are bearer credentials).

    python broker_client.py ADDRESS [--ca-file FILE] [--api-key-file FILE] [--file-id ID]

ADDRESS is `host:port` (plaintext, or TLS with --ca-file), or a Unix socket in grpc-core's forms:
`unix:/run/box-broker/broker.sock` (absolute) or `unix:broker.sock`
(relative to the working directory). Against `box-broker dev`:

    python broker_client.py 127.0.0.1:50051

Stubs: generate them next to this file from the repository's protos (see
README.md in this directory):

    python -m grpc_tools.protoc -I ../../../proto --python_out=. \
        --grpc_python_out=. boxbroker/v1/broker.proto

Errors: a failed call prints the gRPC status, what to fix, and the
machine-readable reason the broker sends in the status details
(google.rpc.ErrorInfo, e.g. POLICY_DENIED; read with grpcio-status), and
exits 1.
"""

import argparse
import json
import sys

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from boxbroker.v1 import broker_pb2 as pb
from boxbroker.v1 import broker_pb2_grpc as rpc


def reason(error: grpc.RpcError) -> str:
    """The ErrorInfo reason (and metadata) of a failed call, as " (reason X)"."""
    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            extra = "".join(f", {k}={v}" for k, v in sorted(info.metadata.items()))
            return f" (reason {info.reason}{extra})"
    return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address")
    parser.add_argument("--ca-file", help="TLS: the CA that signed the broker's certificate")
    parser.add_argument("--api-key-file", help="send this file's contents as x-api-key")
    parser.add_argument("--file-id", default="7600001", help="the file to downscope to (dev: the Service Account's file)")
    args = parser.parse_args()

    metadata = []
    if args.api_key_file:
        with open(args.api_key_file, encoding="utf-8") as f:
            metadata.append(("x-api-key", f.read().strip()))

    enterprise = pb.Subject(enterprise=pb.EnterpriseSubject())
    if args.ca_file:
        with open(args.ca_file, "rb") as f:
            channel = grpc.secure_channel(args.address, grpc.ssl_channel_credentials(root_certificates=f.read()))
    else:
        channel = grpc.insecure_channel(args.address)
    with channel:
        broker = rpc.TokenBrokerServiceStub(channel)
        try:
            full = broker.GetToken(pb.GetTokenRequest(subject=enterprise), metadata=metadata, timeout=10)
            down = broker.GetDownscopedToken(
                pb.GetDownscopedTokenRequest(subject=enterprise, scopes=["item_preview"], file_id=args.file_id),
                metadata=metadata,
                timeout=10,
            )
        except grpc.RpcError as e:
            print(f"{e.code().name}: {e.details()}{reason(e)}", file=sys.stderr)
            return 1

    print(
        json.dumps(
            {
                "enterprise": {
                    "token_length": len(full.token.access_token),
                    "expires_at": full.token.expires_at.ToJsonString(),
                    "cache_hit": full.cache_hit,
                },
                "downscoped": {
                    "token_length": len(down.token.access_token),
                    "scopes": list(down.token.scopes),
                    "restricted_to": [
                        {"scope": r.scope, "object_type": r.object_type, "object_id": r.object_id}
                        for r in down.token.restricted_to
                    ],
                },
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
