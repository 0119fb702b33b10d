//! network: the network and subnet the VM joins exist: the named test
//! network, or the item's target network (created with a /24 around the
//! source's first NIC if missing; creating the same again is a no-op).

use std::sync::Arc;

use ferry_runtime::Refused;

use super::Result;
use crate::engine::Engine;
use crate::inventory::{self, Network, Subnet};
use crate::jobs::JobRecord;

pub(super) async fn run(engine: &Arc<Engine>, job: &mut JobRecord) -> Result<String> {
    let (net, subnet) = network(engine, job).await?;
    Ok(format!("network {} subnet {}", net.name, subnet.name))
}

/// The network and subnet the job's VM joins.
pub(crate) async fn network(engine: &Engine, job: &JobRecord) -> Result<(Network, Subnet)> {
    let item = engine.item(job.vm()?).await?;
    let target = &item.target;
    let backend = engine.backend();
    let net = if job.is_test() {
        backend
            .network(&target.region, &job.test_network)?
            .ok_or_else(|| {
                Refused::not_found(format!(
                    "test network {:?} does not exist in {}",
                    job.test_network, target.region
                ))
            })?
    } else {
        match backend.network(&target.region, &target.virtual_network)? {
            Some(n) => n,
            None => {
                let ip = item
                    .source_nics
                    .first()
                    .map(|n| n.private_ip.clone())
                    .unwrap_or_default();
                backend.create_network(Network {
                    region: target.region.clone(),
                    resource_group: target.resource_group.clone(),
                    name: target.virtual_network.clone(),
                    subnets: vec![Subnet {
                        name: target.subnet.clone(),
                        address_prefix: inventory::subnet_around(&ip),
                    }],
                })?
            }
        }
    };
    let subnet = if job.is_test() {
        net.subnets.first().cloned()
    } else {
        net.subnets
            .iter()
            .find(|s| s.name == target.subnet)
            .cloned()
    }
    .ok_or_else(|| {
        Refused::failed_precondition(format!(
            "network {} has no subnet {:?}",
            net.name, target.subnet
        ))
    })?;
    Ok((net, subnet))
}
