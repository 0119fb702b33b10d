//! start-vm: the VM create-vm defined is started on its host, and the step
//! ends once it is ready: running, and when its shape names a ready marker,
//! that marker on its serial console. A VM that stops before it is ready,
//! or is not ready within the engine's start timeout, fails the step with
//! its console's path. Starting a VM that runs already is a no-op, so a
//! resumed step is harmless. The local inventory starts nothing.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry_runtime::Refused;
use tokio::time::Instant;

use super::{target_names, Result};
use crate::engine::Engine;
use crate::inventory::{Run, TargetVm};
use crate::jobs::JobRecord;

/// How often readiness is looked at.
const POLL: Duration = Duration::from_millis(250);

pub(super) async fn run(engine: &Arc<Engine>, job: &mut JobRecord) -> Result<String> {
    let item = engine.item(job.vm()?).await?;
    let (name, _) = target_names(job, &item);
    let (region, group) = (
        item.target.region.clone(),
        item.target.resource_group.clone(),
    );
    let vm = engine
        .backend()
        .vms()?
        .into_iter()
        .find(|v| v.region == region && v.resource_group == group && v.name == name)
        .ok_or_else(|| {
            Refused::failed_precondition(format!(
                "VM {name} is not in {region}/{group}; create-vm has not recorded it"
            ))
        })?;
    let started = {
        let vm = vm.clone();
        engine.on_backend(move |b| b.start_vm(&vm)).await?
    };
    if started == Run::Nothing {
        return Ok(format!(
            "VM {name} recorded; the local inventory starts nothing"
        ));
    }
    let deadline = Instant::now() + engine.start_timeout;
    loop {
        let state = {
            let vm = vm.clone();
            engine.on_backend(move |b| b.run_state(&vm)).await?
        };
        let marker_seen = match &vm.shape.ready_marker {
            Some(marker) => console_has(Path::new(&vm.console_path), marker),
            None => state == Run::Running,
        };
        if marker_seen {
            return Ok(ready(&vm));
        }
        if let Run::Stopped(how) = &state {
            return Err(Refused::failed_precondition(format!(
                "VM {name} ({}) is {how} before it was ready; its console: {}",
                vm.domain, vm.console_path
            ))
            .into());
        }
        if Instant::now() >= deadline {
            return Err(Refused::deadline_exceeded(format!(
                "VM {name} ({}) runs but did not print {:?} on its console within {:?}; \
                 its console: {}",
                vm.domain,
                vm.shape.ready_marker.as_deref().unwrap_or_default(),
                engine.start_timeout,
                vm.console_path
            ))
            .into());
        }
        tokio::select! {
            _ = engine.shutdown.cancelled() => {
                return Err(Refused::unavailable("failover-svc is shutting down").into());
            }
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

fn ready(vm: &TargetVm) -> String {
    match &vm.shape.ready_marker {
        Some(marker) => format!(
            "VM {} runs on {} and printed {marker:?} on its console",
            vm.name, vm.host
        ),
        None => format!("VM {} runs on {}", vm.name, vm.host),
    }
}

/// Whether the console file holds a line containing `marker`. A console
/// not written yet holds nothing.
fn console_has(path: &Path, marker: &str) -> bool {
    std::fs::read(path)
        .map(|b| {
            String::from_utf8_lossy(&b)
                .lines()
                .any(|l| l.contains(marker))
        })
        .unwrap_or(false)
}
