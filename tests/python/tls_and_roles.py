"""Calls registry-svc over mutual TLS from a Python client generated from proto/.

Usage: tls_and_roles.py GENERATED_DIR REGISTRY_ADDR CA READER_CERT READER_KEY OPERATOR_TOKEN
Prints one JSON object with the outcome of each call (a gRPC code name).
"""

import json
import sys

sys.path.insert(0, sys.argv[1])

import grpc  # noqa: E402
from ferry.registry.v1 import registry_pb2 as pb  # noqa: E402
from ferry.registry.v1 import registry_pb2_grpc as rpc  # noqa: E402


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def outcome(call) -> str:
    try:
        call()
        return "OK"
    except grpc.RpcError as err:
        return err.code().name


def main() -> None:
    addr, ca, cert, key, token = sys.argv[2:7]
    vm = pb.Vm(
        name="py-tls",
        source_region="eastus",
        resource_group="py-rg",
        virtual_network="py-vnet",
        subnet="default",
        nics=[pb.Nic(name="nic0", private_ip="10.9.0.5")],
        disks=[pb.Disk(id="os", size_bytes=8 << 30, role=pb.DISK_ROLE_OS,
                       storage=pb.DISK_STORAGE_MANAGED, source_path="/images/py-tls.raw")],
    )
    register = pb.RegisterVmRequest(vm=vm)

    # TLS, no client certificate, no token.
    anonymous = rpc.RegistryStub(grpc.secure_channel(
        addr, grpc.ssl_channel_credentials(root_certificates=read(ca))))
    # A reader's client certificate.
    reader = rpc.RegistryStub(grpc.secure_channel(addr, grpc.ssl_channel_credentials(
        root_certificates=read(ca), private_key=read(key), certificate_chain=read(cert))))
    # An operator's bearer token.
    operator_creds = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(root_certificates=read(ca)),
        grpc.access_token_call_credentials(token))
    operator = rpc.RegistryStub(grpc.secure_channel(addr, operator_creds))
    # Plaintext to the TLS port.
    plaintext = rpc.RegistryStub(grpc.insecure_channel(addr))

    print(json.dumps({
        "anonymous_list": outcome(lambda: anonymous.ListVms(pb.ListVmsRequest(), timeout=10)),
        "reader_list": outcome(lambda: reader.ListVms(pb.ListVmsRequest(), timeout=10)),
        "reader_register": outcome(lambda: reader.RegisterVm(register, timeout=10)),
        "operator_register": outcome(lambda: operator.RegisterVm(register, timeout=10)),
        "plaintext_list": outcome(lambda: plaintext.ListVms(pb.ListVmsRequest(), timeout=10)),
    }))


if __name__ == "__main__":
    main()
