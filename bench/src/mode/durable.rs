//! `durable`: `throughput`'s load shape with durable messages. Each
//! message is logged and synced by the relay before it acknowledges it;
//! the report adds the time from queueing to that ack (p50, p99). The
//! receivers acknowledge what they take, so the relay releases it.

use crate::BadArgs;
use crate::cli::{Broker, ClientArg, ThroughputArgs};
use crate::run::{Common, Plan};

/// The plan for a durable run: throughput's, durable.
pub fn plan(a: &ThroughputArgs) -> anyhow::Result<(Common, Plan)> {
    if a.target.broker == Broker::Nats {
        return Err(BadArgs(
            "durable --broker nats: the NATS comparison covers best-effort throughput and \
             latency (nats-server without JetStream); leave --broker out"
                .into(),
        )
        .into());
    }
    if a.msg.client != ClientArg::Cell {
        return Err(BadArgs(
            "durable --client raw: durable messages are sent and acknowledged through \
             relay-client cells; leave --client out"
                .into(),
        )
        .into());
    }
    let (common, mut plan) = super::throughput::plan(a)?;
    plan.mode = "durable";
    plan.durable = true;
    Ok((common, plan))
}
