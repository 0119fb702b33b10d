"""Registers and protects a VM through a Python client generated from proto/.

Usage: register_and_enable.py GENERATED_DIR REGISTRY_ADDR
Prints one JSON object with what the registry answered.
"""

import json
import sys

sys.path.insert(0, sys.argv[1])

import grpc  # noqa: E402
from ferry.registry.v1 import registry_pb2 as pb  # noqa: E402
from ferry.registry.v1 import registry_pb2_grpc as rpc  # noqa: E402


def main() -> None:
    channel = grpc.insecure_channel(sys.argv[2])
    registry = rpc.RegistryStub(channel)
    vm = pb.Vm(
        name="py-vm",
        source_region="eastus",
        resource_group="py-rg",
        virtual_network="py-vnet",
        subnet="default",
        nics=[pb.Nic(name="nic0", private_ip="10.9.0.4")],
        disks=[
            pb.Disk(id="os", size_bytes=8 << 30, role=pb.DISK_ROLE_OS,
                    storage=pb.DISK_STORAGE_MANAGED, source_path="/images/py-os.raw"),
            pb.Disk(id="data", size_bytes=16 << 30, role=pb.DISK_ROLE_DATA,
                    storage=pb.DISK_STORAGE_MANAGED, source_path="/images/py-data.raw"),
        ],
    )
    registry.RegisterVm(pb.RegisterVmRequest(vm=vm))

    refused = None
    try:
        registry.EnableReplication(
            pb.EnableReplicationRequest(vm_name="py-vm", target_region="eastus"))
    except grpc.RpcError as err:
        refused = err.code().name

    item = registry.EnableReplication(
        pb.EnableReplicationRequest(vm_name="py-vm", target_region="westeurope"))
    print(json.dumps({
        "state": pb.ReplicationState.Name(item.state),
        "target_region": item.target.region,
        "target_resource_group": item.target.resource_group,
        "replica_disks": [d.name for d in item.target.replica_disks],
        "same_region_refused_with": refused,
    }))


if __name__ == "__main__":
    main()
