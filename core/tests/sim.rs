//! The deterministic mesh simulation (harness in `mesh_sim/mod.rs`): many relay
//! nodes and cells in one process on a simulated network, one seeded
//! generator, random topologies, traffic, link cuts, crashes, restarts,
//! delays and reordering, with the invariants checked at every step.
//!
//! - `cargo test -p relay-core --test sim`: a bounded set of seeds (up to
//!   30 relays and 200 cells), for CI.
//! - `SIM_SEED=N cargo test -p relay-core --test sim replay -- --nocapture`:
//!   replays one seed exactly (a failing seed prints this line).
//! - `SIM_SEEDS=10000 cargo test -p relay-core --release --test sim long_run -- --ignored --nocapture`:
//!   the long run, 10,000 seeds (`SIM_SEEDS` sets how many; 10,000 by default).
//! - `cargo test -p relay-core --release --test sim scale_run -- --ignored --nocapture`:
//!   the scale run, 1,000 relays and 100,000 cells: rounds to converge,
//!   route memory per relay, control bytes per relay per round
//!   (`SCALE_RELAYS` and `SCALE_CELLS` change the size, to compare).

mod mesh_sim;

use mesh_sim::{Sim, SimConfig, Topology};
use relay_core::{DropReason, MeshConfig};

/// The simulation of `seed`: its topology, size and fault rate all drawn
/// from the seed.
fn config_for(seed: u64) -> SimConfig {
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed);
    let topology = match rng.u32(0..5) {
        0 => Topology::Line,
        1 => Topology::Ring,
        2 => Topology::Square,
        3 => Topology::Random {
            extra_tenths: rng.u32(0..20),
        },
        _ => Topology::Full,
    };
    let relays = match topology {
        Topology::Full => rng.usize(2..=10),
        _ => rng.usize(2..=30),
    };
    let cells = rng.usize(relays..=200.min(relays * 8));
    let mut cfg = SimConfig::small(relays, cells, topology);
    cfg.chaos_rounds = rng.u32(100..300);
    cfg.fault_per_mille = rng.u32(10..60);
    cfg
}

/// Runs one seed; a failure prints how to replay it.
fn run_seed(seed: u64) -> mesh_sim::SimReport {
    let cfg = config_for(seed);
    let desc = format!(
        "{:?}, {} relays, {} cells",
        cfg.topology, cfg.relays, cfg.cells
    );
    let r = std::panic::catch_unwind(|| Sim::new(cfg, seed).run());
    match r {
        Ok(report) => report,
        Err(e) => {
            eprintln!(
                "mesh simulation failed for seed {seed} ({desc}); replay it with\n  \
                 SIM_SEED={seed} cargo test -p relay-core --test sim replay -- --nocapture"
            );
            std::panic::resume_unwind(e)
        }
    }
}

#[test]
fn bounded_seeds_keep_every_invariant() {
    let mut total = mesh_sim::SimReport::default();
    for seed in 0..12u64 {
        let r = run_seed(seed);
        assert!(r.rounds_to_converge <= r.converge_bound);
        total.probe_deliveries += r.probe_deliveries;
        total.faults += r.faults;
        total.delivered += r.delivered;
    }
    // The runs did something: faults happened and probes were checked.
    assert!(total.faults > 0, "{total:?}");
    assert!(total.probe_deliveries > 100, "{total:?}");
}

#[test]
fn each_topology_at_its_largest() {
    for (i, t) in [
        Topology::Line,
        Topology::Ring,
        Topology::Square,
        Topology::Random { extra_tenths: 10 },
    ]
    .into_iter()
    .enumerate()
    {
        let mut cfg = SimConfig::small(30, 200, t);
        cfg.chaos_rounds = 150;
        let r = Sim::new(cfg, 1000 + i as u64).run();
        assert!(r.probe_deliveries > 0, "{t:?}: {r:?}");
    }
    let mut cfg = SimConfig::small(10, 100, Topology::Full);
    cfg.chaos_rounds = 150;
    Sim::new(cfg, 1010).run();
}

#[test]
fn a_broadcast_on_a_ring_reaches_every_cell_once_and_no_relay_forwards_it_twice() {
    let mut s = Sim::new(SimConfig::small(5, 10, Topology::Ring), 7);
    let bound = s.converge_bound();
    s.converge(bound);
    for _ in 0..10 {
        s.round();
    }
    // Every cell broadcasts once; each reaches the 9 others exactly once
    // (the harness fails on a second delivery or a second forward).
    let before = s.report.delivered;
    s.broadcast_from_all();
    s.drain(200);
    assert_eq!(s.report.delivered - before, 10 * 9);
}

#[test]
fn a_relay_crash_on_a_square_is_routed_around() {
    let mut s = Sim::new(SimConfig::small(4, 8, Topology::Square), 11);
    let bound = s.converge_bound();
    s.converge(bound);
    for _ in 0..10 {
        s.round();
    }
    assert!(s.probe_unicast(40, 200) >= 40);
    s.kill(1);
    let rounds = s.converge(bound);
    assert!(rounds > 0);
    for _ in 0..10 {
        s.round();
    }
    assert!(s.probe_unicast(40, 200) >= 40);
}

#[test]
fn a_slow_lane_runs_out_of_credit_and_drops_only_there() {
    let mut cfg = SimConfig::small(3, 6, Topology::Line);
    cfg.mesh = MeshConfig {
        lane_credit: 4,
        ..cfg.mesh
    };
    let mut s = Sim::new(cfg, 5);
    let bound = s.converge_bound();
    s.converge(bound);
    for _ in 0..10 {
        s.round();
    }
    // A burst far beyond the credit window within one round: the relay
    // drops what has no credit, and counts it.
    s.burst(200);
    s.drain(200);
    assert!(s.drops(DropReason::SlowReceiver) > 0);
}

#[test]
fn replay() {
    let Ok(seed) = std::env::var("SIM_SEED") else {
        return;
    };
    let seed: u64 = seed.parse().expect("SIM_SEED is a number");
    let a = run_seed(seed);
    let b = run_seed(seed);
    assert_eq!(format!("{a:?}"), format!("{b:?}"), "a seed replays exactly");
    println!("seed {seed}: {a:?}");
}

#[test]
fn a_seed_replays_exactly() {
    let a = run_seed(3);
    let b = run_seed(3);
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
}

#[test]
#[ignore = "the long run: 10,000 seeds; see the file's documentation"]
fn long_run() {
    let n: u64 = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let first: u64 = std::env::var("SIM_FIRST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut worst = 0;
    for seed in first..first + n {
        let r = run_seed(seed);
        worst = worst.max(r.rounds_to_converge);
        if seed % 500 == 0 {
            println!("seed {seed}: ok (worst rounds to converge so far {worst})");
        }
    }
    println!("{n} seeds passed; worst rounds to converge {worst}");
}

#[test]
#[ignore = "the scale run: 1,000 relays and 100,000 cells; see the file's documentation"]
fn scale_run() {
    let get = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    mesh_sim::scale_run(get("SCALE_RELAYS", 1_000), get("SCALE_CELLS", 100_000));
}
