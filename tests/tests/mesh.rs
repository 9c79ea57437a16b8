//! Relays peered into a mesh, as real processes: cells on different
//! relays reach each other across hops on every lane, over QUIC and TCP
//! peer links; a relay whose key is not trusted is refused with a reason;
//! a broadcast on a ring reaches each cell once; a square routes around a
//! relay killed with SIGKILL; a restarted relay is peered again; a cell
//! that moves is reachable where it went. Every wait is on an event (a
//! metric, a log line, a message), bounded.

use relay_client::cell::Cell;
use relay_codec::{Keypair, Lane};
use relay_link::Transport;
use relay_tests::cells::{WAIT, connect, options_over, within};
use relay_tests::mesh::{Planned, degrees, start_mesh};
use relay_tests::{RelayProcess, each_transport};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Probes sent at most before a route is declared missing.
const PROBES: u32 = 120;
/// How long one probe is waited for before the next is sent.
const PROBE_WAIT: Duration = Duration::from_millis(500);

/// Sends probes from `from` to `to` until one arrives (the mesh learns
/// where `to` is: link states flooded, its location registered with its
/// directory relays); returns how long it took. Probes that arrive later
/// are skipped by [`collect`].
async fn reach(from: &Cell, to: &mut Cell) -> Duration {
    let start = Instant::now();
    for i in 0..PROBES {
        from.send(
            to.public_key(),
            Lane::Normal,
            format!("probe {i}").into_bytes(),
        )
        .await
        .expect("probe sent");
        if let Ok(Some(m)) = tokio::time::timeout(PROBE_WAIT, to.recv()).await {
            assert!(
                m.payload.starts_with(b"probe "),
                "a probe, got {:?}",
                m.payload
            );
            assert_eq!(m.source, from.public_key());
            return start.elapsed();
        }
    }
    panic!(
        "no probe from {} reached {} through the mesh",
        from.public_key(),
        to.public_key()
    );
}

/// Relay `i` of a mesh some of whose relays were killed.
fn relay(mesh: &[Option<(Planned, RelayProcess)>], i: usize) -> &RelayProcess {
    &mesh[i].as_ref().expect("running").1
}

/// The next `n` payloads `cell` receives that are not probes.
async fn collect(cell: &mut Cell, n: usize, what: &str) -> BTreeSet<String> {
    let mut got = BTreeSet::new();
    within(what, WAIT, async {
        while got.len() < n {
            let m = cell.recv().await.expect("the cell runs");
            if m.payload.starts_with(b"probe ") {
                continue;
            }
            let text = String::from_utf8(m.payload.to_vec()).expect("text");
            assert!(got.insert(text.clone()), "{what}: {text:?} arrived twice");
        }
    })
    .await;
    got
}

each_transport!(a_line_of_three_relays_carries_every_lane_both_ways);

async fn a_line_of_three_relays_carries_every_lane_both_ways(t: Transport) {
    let edges = [(0, 1), (1, 2)];
    let mesh = start_mesh(3, &edges, t);
    for ((_, r), d) in mesh.iter().zip(degrees(3, &edges)) {
        r.wait_metric_async("celluler_peers", "", d as f64, WAIT)
            .await;
    }
    let (ra, rb, rc) = (&mesh[0].1, &mesh[1].1, &mesh[2].1);
    rb.wait_log_async("peer link up", WAIT).await;
    let mut a = connect(ra, Keypair::generate(), options_over(t)).await;
    let mut c = connect(rc, Keypair::generate(), options_over(t)).await;
    let ac = reach(&a, &mut c).await;
    let ca = reach(&c, &mut a).await;
    println!("line over {t}: A reached C after {ac:?}, C reached A after {ca:?}");
    let before = rb.metric("celluler_forwarded_to_relay_total", "");
    let mut want_c = BTreeSet::new();
    let mut want_a = BTreeSet::new();
    for lane in Lane::ALL {
        let to_c = format!("{lane:?} from A to C");
        let to_a = format!("{lane:?} from C to A");
        a.send(c.public_key(), lane, to_c.clone().into_bytes())
            .await
            .expect("send A to C");
        c.send(a.public_key(), lane, to_a.clone().into_bytes())
            .await
            .expect("send C to A");
        want_c.insert(to_c);
        want_a.insert(to_a);
    }
    assert_eq!(collect(&mut c, 4, "every lane A to C").await, want_c);
    assert_eq!(collect(&mut a, 4, "every lane C to A").await, want_a);
    // Each of the eight crossed the middle relay, forwarded to a relay.
    rb.wait_metric_async("celluler_forwarded_to_relay_total", "", before + 8.0, WAIT)
        .await;
    check_views(&mesh[0].0, &mesh[1].0, &mesh[2].0, ra, rb);
    for (_, r) in mesh {
        r.stop();
    }
}

/// The admin views of the line A–B–C: B's peers, A's route to C, A's
/// topology as JSON and DOT.
fn check_views(a: &Planned, b: &Planned, c: &Planned, ra: &RelayProcess, rb: &RelayProcess) {
    let json = |r: &RelayProcess, path: &str| -> serde_json::Value {
        let (status, body) = r.http_get(path);
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path} is not JSON ({e}): {body}"))
    };
    let peers = json(rb, "/peers");
    let mut keys: Vec<String> = peers["peers"]
        .as_array()
        .expect("a peers list")
        .iter()
        .map(|p| p["key"].as_str().expect("a key").to_owned())
        .collect();
    keys.sort();
    let mut want = vec![a.key.to_string(), c.key.to_string()];
    want.sort();
    assert_eq!(keys, want, "B's peers: {peers}");
    let routes = json(ra, "/routes");
    let to_c = routes["routes"]
        .as_array()
        .expect("a routes list")
        .iter()
        .find(|r| r["relay"] == c.key.to_string())
        .unwrap_or_else(|| panic!("A has no route to C: {routes}"));
    assert_eq!(to_c["hops"], 2, "{routes}");
    assert_eq!(to_c["next_hop"], b.key.to_string(), "{routes}");
    let topology = json(ra, "/topology");
    assert_eq!(
        topology["relays"].as_array().map(Vec::len),
        Some(3),
        "{topology}"
    );
    let (status, dot) = ra.http_get("/topology?format=dot");
    assert_eq!(status, 200);
    assert!(dot.starts_with("graph mesh {"), "{dot}");
    assert_eq!(
        dot.matches(" -- ").count(),
        2,
        "two links, each once: {dot}"
    );
    for (x, y) in [(a, b), (b, c)] {
        let (lo, hi) = if x.key.to_string() < y.key.to_string() {
            (x, y)
        } else {
            (y, x)
        };
        assert!(
            dot.contains(&format!("\"{}\" -- \"{}\"", lo.key, hi.key)),
            "{dot}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_key_is_not_trusted_is_refused_with_a_reason() {
    // B trusts only C's key (a configured peer of nobody's, here); A dials
    // B without being trusted there.
    let (a, b, c) = (Planned::new(), Planned::new(), Planned::new());
    let rb = b.start(&format!("[mesh]\ntrusted_relays = [\"{}\"]\n", c.key));
    let ra = a.start(&format!(
        "[mesh]\npeers = [{:?}]\n",
        b.peer(Transport::Quic)
    ));
    rb.wait_log_async(&format!("relay {} is not trusted here", a.key), WAIT)
        .await;
    rb.wait_metric_async("celluler_relays_refused_total", "", 1.0, WAIT)
        .await;
    // The dialer hears why and keeps redialing, with backoff.
    ra.wait_log_async("dialing peer relay failed", WAIT).await;
    ra.wait_log_async("not trusted here", WAIT).await;
    assert_eq!(rb.metric("celluler_peers", ""), 0.0);
    assert_eq!(ra.metric("celluler_peers", ""), 0.0);
    drop(c);
    ra.stop();
    rb.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_of_five_relays_delivers_one_broadcast_to_each_cell_exactly_once() {
    let edges = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 0)];
    let mesh = start_mesh(5, &edges, Transport::Quic);
    for (_, r) in &mesh {
        r.wait_metric_async("celluler_peers", "", 2.0, WAIT).await;
    }
    let mut cells = Vec::new();
    for (_, r) in &mesh {
        cells.push(connect(r, Keypair::generate(), options_over(Transport::Quic)).await);
    }
    let before: Vec<f64> = mesh
        .iter()
        .map(|(_, r)| r.metric("celluler_forwarded_to_relay_total", ""))
        .collect();
    // Two broadcasts: a copy of the first arriving after the second would
    // be a duplicate through the longer way round.
    for round in ["first", "second"] {
        cells[0]
            .broadcast(Lane::Normal, format!("{round} broadcast").into_bytes())
            .await
            .expect("broadcast sent");
        for (i, cell) in cells.iter_mut().enumerate().skip(1) {
            let m = within("the broadcast", WAIT, cell.recv())
                .await
                .expect("the cell runs");
            assert_eq!(
                m.payload,
                format!("{round} broadcast").as_bytes(),
                "cell on relay {i}: the {round} broadcast, once"
            );
        }
    }
    // No loop: each relay sent each broadcast on at most its two links.
    for (i, (_, r)) in mesh.iter().enumerate() {
        let sent = r.metric("celluler_forwarded_to_relay_total", "") - before[i];
        assert!(
            sent <= 4.0,
            "relay {i} forwarded {sent} copies of two broadcasts"
        );
    }
    // The sender's own cell gets no copy back: its next message is this.
    cells[1]
        .send(cells[0].public_key(), Lane::Normal, b"after".to_vec())
        .await
        .expect("send");
    let m = within("after", WAIT, cells[0].recv()).await.expect("runs");
    assert_eq!(
        m.payload,
        b"after".as_slice(),
        "no broadcast came back to its sender"
    );
    for (_, r) in mesh {
        r.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_square_resumes_traffic_between_opposite_corners_after_sigkill_of_the_relay_on_the_path()
{
    let edges = [(0, 1), (1, 2), (2, 3), (3, 0)];
    let mut mesh: Vec<Option<(Planned, RelayProcess)>> = start_mesh(4, &edges, Transport::Quic)
        .into_iter()
        .map(Some)
        .collect();
    for i in 0..4 {
        relay(&mesh, i)
            .wait_metric_async("celluler_peers", "", 2.0, WAIT)
            .await;
    }
    let a = connect(
        relay(&mesh, 0),
        Keypair::generate(),
        options_over(Transport::Quic),
    )
    .await;
    let mut c = connect(
        relay(&mesh, 2),
        Keypair::generate(),
        options_over(Transport::Quic),
    )
    .await;
    reach(&a, &mut c).await;
    // The relay the route goes through, as corner 0 says.
    let (_, body) = relay(&mesh, 0).http_get("/routes");
    let routes: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let to_c = mesh[2].as_ref().expect("running").0.key.to_string();
    let next = routes["routes"]
        .as_array()
        .expect("routes")
        .iter()
        .find(|r| r["relay"] == to_c)
        .and_then(|r| r["next_hop"].as_str())
        .unwrap_or_else(|| panic!("no route to corner 2: {routes}"))
        .to_owned();
    let used = [1, 3]
        .into_iter()
        .find(|&i| mesh[i].as_ref().expect("running").0.key.to_string() == next)
        .unwrap_or_else(|| panic!("the next hop {next} is not a neighbour corner"));
    let (_, killed) = mesh[used].take().expect("running");
    killed.kill();
    let start = Instant::now();
    let took = reach(&a, &mut c).await;
    let lost = (took.as_millis() / PROBE_WAIT.as_millis()) as u64;
    println!(
        "square: traffic resumed {:?} after SIGKILL of relay {used} on the path (about {lost} \
         best-effort probes lost meanwhile, one per {PROBE_WAIT:?})",
        start.elapsed()
    );
    // The other way too, through the corner left.
    reach(&c, &mut { a }).await;
    for (_, r) in mesh.into_iter().flatten() {
        r.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_restarts_is_peered_again_and_its_cells_are_reachable_again() {
    let edges = [(0, 1), (1, 2)];
    let mut mesh: Vec<Option<(Planned, RelayProcess)>> = start_mesh(3, &edges, Transport::Quic)
        .into_iter()
        .map(Some)
        .collect();
    for (i, d) in degrees(3, &edges).into_iter().enumerate() {
        relay(&mesh, i)
            .wait_metric_async("celluler_peers", "", d as f64, WAIT)
            .await;
    }
    let a = connect(
        relay(&mesh, 0),
        Keypair::generate(),
        options_over(Transport::Quic),
    )
    .await;
    let mut c = connect(
        relay(&mesh, 2),
        Keypair::generate(),
        options_over(Transport::Quic),
    )
    .await;
    reach(&a, &mut c).await;
    // C dies (SIGKILL) and starts again with its key, port and peer B.
    let (plan_c, rc) = mesh[2].take().expect("running");
    rc.kill();
    drop(c);
    let b_peer = mesh[1].as_ref().expect("running").0.peer(Transport::Quic);
    let start = Instant::now();
    let rc = plan_c.start(&format!("[mesh]\npeers = [{b_peer:?}]\n"));
    rc.wait_metric_async("celluler_peers", "", 1.0, WAIT).await;
    relay(&mesh, 1)
        .wait_metric_async("celluler_peers", "", 2.0, WAIT)
        .await;
    let mut c = connect(&rc, Keypair::generate(), options_over(Transport::Quic)).await;
    let took = reach(&a, &mut c).await;
    println!(
        "restart: C peered again and its new cell reached {:?} after its start ({took:?} of probes)",
        start.elapsed()
    );
    rc.stop();
    for (_, r) in mesh.into_iter().flatten() {
        r.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cell_that_moves_to_another_relay_is_reachable_there() {
    let edges = [(0, 1), (1, 2)];
    let mesh = start_mesh(3, &edges, Transport::Quic);
    for ((_, r), d) in mesh.iter().zip(degrees(3, &edges)) {
        r.wait_metric_async("celluler_peers", "", d as f64, WAIT)
            .await;
    }
    let a = connect(
        &mesh[0].1,
        Keypair::generate(),
        options_over(Transport::Quic),
    )
    .await;
    let key = Keypair::generate();
    let mut x = connect(&mesh[2].1, key.clone(), options_over(Transport::Quic)).await;
    reach(&a, &mut x).await;
    // x leaves C and attaches to B: A's route to it (home C) is stale.
    within("x closes", WAIT, x.close())
        .await
        .expect("closes cleanly");
    let mut x = connect(&mesh[1].1, key, options_over(Transport::Quic)).await;
    let took = reach(&a, &mut x).await;
    println!("move: x reachable on B {took:?} after it attached there");
    for (_, r) in mesh {
        r.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_relay_whose_address_the_mesh_announced_is_dialed() {
    // A and C each peer with B only, and trust each other's key without
    // an address: they learn it from the LinkStates B passes on, and link.
    let (a, b, c) = (Planned::new(), Planned::new(), Planned::new());
    let q = Transport::Quic;
    let rb = b.start(&format!(
        "[mesh]\npeers = [{:?}, {:?}]\n",
        a.peer(q),
        c.peer(q)
    ));
    let ra = a.start(&format!(
        "[mesh]\npeers = [{:?}]\ntrusted_relays = [\"{}\"]\n",
        b.peer(q),
        c.key
    ));
    let rc = c.start(&format!(
        "[mesh]\npeers = [{:?}]\ntrusted_relays = [\"{}\"]\n",
        b.peer(q),
        a.key
    ));
    ra.wait_metric_async("celluler_peers", "", 2.0, WAIT).await;
    rc.wait_metric_async("celluler_peers", "", 2.0, WAIT).await;
    let (_, body) = ra.http_get("/peers");
    assert!(body.contains(&c.key.to_string()), "A links with C: {body}");
    for r in [ra, rb, rc] {
        r.stop();
    }
}

/// Runs `cell trace ARGS` as a real process to its end (bounded by
/// [`WAIT`], polled); returns (exit success, stdout, stderr).
async fn cell_trace(args: Vec<String>) -> (bool, String, String) {
    tokio::task::spawn_blocking(move || {
        let mut child = std::process::Command::new(relay_tests::bin_path("cell"))
            .arg("trace")
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn cell trace");
        let end = Instant::now() + WAIT;
        while matches!(child.try_wait(), Ok(None)) {
            if Instant::now() > end {
                let _ = child.kill();
                let _ = child.wait();
                panic!("cell trace {args:?} ran over {WAIT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().expect("cell trace output");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .expect("cell trace ran")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cell_trace_across_a_line_of_three_relays_prints_each_hop_in_order() {
    let edges = [(0, 1), (1, 2)];
    let mesh = start_mesh(3, &edges, Transport::Quic);
    for ((_, r), d) in mesh.iter().zip(degrees(3, &edges)) {
        r.wait_metric_async("celluler_peers", "", d as f64, WAIT)
            .await;
    }
    let (ra, rc) = (&mesh[0].1, &mesh[2].1);
    let dir = tempfile::tempdir().expect("temp dir");
    let key_file = dir.path().join("a.key");
    let ka = Keypair::generate();
    relay_codec::keyfile::write_keyfile(&key_file, &ka).expect("key file");
    // A's cell is connected once to learn the route (the probes), then
    // closed: `cell trace` attaches with the same key.
    let a = connect(ra, ka.clone(), options_over(Transport::Quic)).await;
    let mut c = connect(rc, Keypair::generate(), options_over(Transport::Quic)).await;
    reach(&a, &mut c).await;
    let _ = a.close().await;
    let args = |dest: String, timeout: &str| {
        vec![
            "--relay".to_owned(),
            ra.addr().to_string(),
            "--key".to_owned(),
            key_file.display().to_string(),
            "--timeout-ms".to_owned(),
            timeout.to_owned(),
            dest,
        ]
    };
    let (ok, out, err) = cell_trace(args(c.public_key().to_string(), "10000")).await;
    assert!(ok, "cell trace failed: {out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "3 hops and the last line: {out}");
    for (i, (p, _)) in mesh.iter().enumerate() {
        assert!(
            lines[i]
                .trim_start()
                .starts_with(&format!("{}  {}", i + 1, p.key)),
            "hop {} is relay {}: {out}",
            i + 1,
            p.key
        );
    }
    assert!(
        lines[2].contains(&format!("-> {} (destination)", c.public_key())),
        "{out}"
    );
    assert!(lines[3].starts_with("destination"), "{out}");
    // A cell attached nowhere: no hop reports it delivered; exit 1.
    let nowhere = Keypair::generate().public();
    let (ok, _, err) = cell_trace(args(nowhere.to_string(), "1500")).await;
    assert!(!ok, "a trace to a cell attached nowhere must fail");
    assert!(err.contains("within 1500 ms"), "a reason: {err}");
    let _ = c.close().await;
    for (_, r) in mesh {
        r.stop();
    }
}
