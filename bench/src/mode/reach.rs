//! `reach`: across a mesh (`--spawn --relays N`), the time from a cell's
//! attach to the last relay until a probe from a cell on every other
//! relay has reached it, over several attaches.

use crate::cells;
use crate::target::Target;
use anyhow::{Context as _, Result, bail};
use relay_codec::{Lane, PublicKey};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// How often each relay's prober sends to a cell it has not reached yet.
const PROBE_EVERY: Duration = Duration::from_millis(10);

/// What the run found.
#[derive(Debug, serde::Serialize)]
pub struct ReachReport {
    /// Always `reach`.
    pub mode: &'static str,
    /// Relays of the mesh.
    pub relays: u32,
    /// The mesh's shape.
    pub topology: Option<String>,
    /// Seconds from each attach (the relay answered the cell) until every
    /// other relay's prober had reached it, in attach order.
    pub secs: Vec<f64>,
    /// Their median, in milliseconds.
    pub median_ms: f64,
    /// Their maximum, in milliseconds.
    pub max_ms: f64,
}

/// Attaches `attaches` cells one after another to the mesh's last relay
/// and times each until a prober on every other relay reaches it; fails
/// if one is not reached within `timeout`.
pub async fn run(target: &Target, attaches: usize, timeout: Duration) -> Result<ReachReport> {
    if target.relays < 2 {
        bail!("reach needs a mesh: --spawn --relays N (N >= 2)");
    }
    let opts = || {
        cells::options(
            relay_client::cell::AuthMode::Link,
            false,
            Vec::new(),
            timeout,
        )
    };
    let others = &target.mesh_addrs[..target.mesh_addrs.len() - 1];
    let mut probers = Vec::with_capacity(others.len());
    for (i, addr) in others.iter().enumerate() {
        let c = cells::connect(addr, opts(), &format!("prober on relay {i}")).await?;
        cells::probe_attached(&c, timeout).await?;
        probers.push(c);
    }
    let mut secs = Vec::with_capacity(attaches);
    for k in 0..attaches {
        let mut cell = cells::connect(&target.rx_addr, opts(), &format!("cell {k}")).await?;
        cells::probe_attached(&cell, timeout).await?;
        let start = Instant::now();
        let dest = cell.public_key();
        let mut missing: BTreeSet<PublicKey> = probers.iter().map(|p| p.public_key()).collect();
        let mut tick = tokio::time::interval(PROBE_EVERY);
        while !missing.is_empty() {
            if start.elapsed() > timeout {
                bail!(
                    "cell {k} was not reached from {} of {} relays within {timeout:?}",
                    missing.len(),
                    probers.len()
                );
            }
            tokio::select! {
                _ = tick.tick() => {
                    for p in probers.iter().filter(|p| missing.contains(&p.public_key())) {
                        p.send(dest, Lane::Normal, b"reach probe".to_vec())
                            .await
                            .context("sending a reach probe")?;
                    }
                }
                m = cell.recv() => {
                    let m = m.context("the cell's link closed")?;
                    missing.remove(&m.source);
                }
            }
        }
        secs.push(start.elapsed().as_secs_f64());
    }
    let mut sorted = secs.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    Ok(ReachReport {
        mode: "reach",
        relays: target.relays,
        topology: target.topology.map(str::to_owned),
        median_ms: (median * 1e4).round() / 10.0,
        max_ms: (sorted[sorted.len() - 1] * 1e4).round() / 10.0,
        secs,
    })
}
