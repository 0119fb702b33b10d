//! `ferry watch`: follows the registry's watch stream, reconnecting when the
//! registry goes away.

use std::time::Duration;

use anyhow::{anyhow, Result};
use ferry_proto::registry::v1 as pb;
use ferry_runtime::{Backoff, RetryParams};

use crate::args::Output;
use crate::commands::Client;
use crate::output;

/// One event as a line for people.
pub fn line(ev: &pb::ProtectedItemEvent) -> String {
    match &ev.item {
        Some(i) => format!(
            "{:<9} {:<20} {:<22} {:>3}%  health {}",
            output::event_kind(ev.kind),
            i.vm_name,
            output::state(i.state),
            i.initial_replication_percent,
            output::health(i.health)
        ),
        None => output::event_kind(ev.kind),
    }
}

fn json(ev: &pb::ProtectedItemEvent) -> serde_json::Value {
    serde_json::json!({
        "kind": output::event_kind(ev.kind),
        "item": ev.item.as_ref().map(output::item_json),
    })
}

/// Prints events until the stream fails with something other than
/// UNAVAILABLE; UNAVAILABLE (registry restarting) reconnects with backoff.
pub async fn run(c: &mut Client, url: &str, out: Output, vm: String) -> Result<()> {
    let mut backoff = Backoff::new(RetryParams {
        base: Duration::from_millis(200),
        ..RetryParams::RECONNECT
    });
    loop {
        let opened = c
            .watch_protected_items(pb::WatchProtectedItemsRequest {
                vm_name: vm.clone(),
            })
            .await;
        let failure = match opened {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                backoff.reset();
                loop {
                    match stream.message().await {
                        Ok(Some(ev)) => match out {
                            Output::Json => println!("{}", json(&ev)),
                            Output::Table => println!("{}", line(&ev)),
                        },
                        Ok(None) => break tonic::Status::unavailable("stream ended"),
                        Err(status) => break status,
                    }
                }
            }
            Err(status) => status,
        };
        if failure.code() != tonic::Code::Unavailable {
            return Err(anyhow!("{:?}: {}", failure.code(), failure.message()));
        }
        eprintln!(
            "watch: registry at {url} unavailable ({}); reconnecting",
            failure.message()
        );
        tokio::time::sleep(backoff.next_delay()).await;
    }
}
