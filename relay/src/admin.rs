//! The admin HTTP endpoint on a local address: Prometheus `GET /metrics`,
//! JSON `GET /health`, and the mesh's views as JSON: `GET /peers` (relay
//! links up), `GET /routes` (shortest paths to every relay known, the
//! route cache's counters) and `GET /topology` (every relay known and its
//! links; `?format=dot` as a Graphviz graph). Anything else is a 404
//! naming the routes.
//!
//! Meant for loopback or an operator network only: it has no authentication.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::metrics::{self, Metrics};

/// The body of every 404: one line listing the routes.
pub const NOT_FOUND_HINT: &str = "not found; routes: GET /metrics, GET /health, GET /peers, \
                                  GET /routes, GET /topology[?format=dot]\n";

/// A view of the mesh the admin endpoint serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeshView {
    /// `/peers`: the relay links up.
    Peers,
    /// `/routes`: shortest paths, the route cache.
    Routes,
    /// `/topology`: `{"self": KEY, "relays": [{"key", "addr", "links": [KEY]}]}`.
    Topology,
}

/// What the admin endpoint serves from. Cheap to clone (two `Arc`s).
#[derive(Clone)]
pub struct AdminState {
    /// The relay's metrics, encoded on each `GET /metrics`.
    pub metrics: Arc<Metrics>,
    /// Builds the `GET /health` body. Called once per request on a runtime
    /// worker thread, so it must be quick and must not block.
    pub health: Arc<dyn Fn() -> serde_json::Value + Send + Sync>,
    /// Builds a mesh view's JSON body; quick and non-blocking, as
    /// `health`.
    pub mesh: Arc<dyn Fn(MeshView) -> serde_json::Value + Send + Sync>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState").finish_non_exhaustive()
    }
}

/// Binds the admin listener on `addr` (port 0 picks a free port; read it back
/// with `local_addr`). Separate from [`serve`] so a bad address fails at
/// start, before anything else runs.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// The admin routes over `state`, for [`serve`] or for embedding.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(get_metrics))
        .route("/health", get(get_health))
        .route("/peers", get(get_peers))
        .route("/routes", get(get_routes))
        .route("/topology", get(get_topology))
        .fallback(not_found)
        .with_state(state)
}

/// Serves the admin endpoint on `listener` until `shutdown` completes, then
/// stops accepting, lets in-flight requests finish and returns. Errors only if
/// the listener itself fails.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "admin endpoint listening (GET /metrics, GET /health)");
    }
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn get_metrics(State(state): State<AdminState>) -> Response {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        state.metrics.encode(),
    )
        .into_response()
}

async fn get_health(State(state): State<AdminState>) -> Response {
    json((state.health)())
}

async fn get_peers(State(state): State<AdminState>) -> Response {
    json((state.mesh)(MeshView::Peers))
}

async fn get_routes(State(state): State<AdminState>) -> Response {
    json((state.mesh)(MeshView::Routes))
}

/// `?format=json` (the default) or `?format=dot`.
async fn get_topology(State(state): State<AdminState>, uri: axum::http::Uri) -> Response {
    let format = uri
        .query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("format="));
    let value = (state.mesh)(MeshView::Topology);
    match format {
        None | Some("json") => json(value),
        Some("dot") => (
            [(header::CONTENT_TYPE, "text/vnd.graphviz")],
            topology_dot(&value),
        )
            .into_response(),
        Some(other) => (
            StatusCode::BAD_REQUEST,
            format!("unknown format {other:?}; use ?format=json or ?format=dot\n"),
        )
            .into_response(),
    }
}

/// The `/topology` JSON as a Graphviz graph: a node per relay (this one
/// drawn bold), an edge per pair of relays either announced a link
/// between, once.
pub fn topology_dot(topology: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let me = topology["self"].as_str().unwrap_or_default();
    let mut out = String::from("graph mesh {\n");
    let mut edges = std::collections::BTreeSet::new();
    for r in topology["relays"].as_array().into_iter().flatten() {
        let key = r["key"].as_str().unwrap_or_default();
        let short: String = key.chars().take(8).collect();
        let style = if key == me { ", style=bold" } else { "" };
        let _ = writeln!(out, "  \"{key}\" [label=\"{short}\"{style}];");
        for n in r["links"].as_array().into_iter().flatten() {
            let n = n.as_str().unwrap_or_default();
            edges.insert(if key < n { (key, n) } else { (n, key) });
        }
    }
    for (a, b) in edges {
        let _ = writeln!(out, "  \"{a}\" -- \"{b}\";");
    }
    out.push_str("}\n");
    out
}

/// A JSON body, newline-terminated.
fn json(value: serde_json::Value) -> Response {
    match serde_json::to_string(&value) {
        Ok(mut body) => {
            body.push('\n');
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the view did not encode: {e}\n"),
        )
            .into_response(),
    }
}

async fn not_found() -> (StatusCode, &'static str) {
    (StatusCode::NOT_FOUND, NOT_FOUND_HINT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// One HTTP/1.1 GET; returns (status, headers, body).
    async fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
            .await
            .expect("response within 10 s")
            .expect("read");
        let text = String::from_utf8(raw).expect("utf-8 response");
        let (head, body) = text.split_once("\r\n\r\n").expect("header end");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status code");
        (status, head.to_ascii_lowercase(), body.to_owned())
    }

    #[tokio::test]
    async fn serves_metrics_health_and_404_then_shuts_down() {
        let metrics = Arc::new(Metrics::new());
        metrics.msgs_in(1, 1, 42);
        metrics.msgs_in(1, 1, 8);
        let state = AdminState {
            metrics: metrics.clone(),
            health: Arc::new(|| serde_json::json!({ "status": "ok", "links": 3 })),
            mesh: Arc::new(|view| match view {
                MeshView::Topology => serde_json::json!({
                    "self": "aaaa",
                    "relays": [
                        { "key": "aaaa", "addr": "h:1", "links": ["bbbb"] },
                        { "key": "bbbb", "addr": "h:2", "links": ["aaaa", "cccc"] },
                    ],
                }),
                v => serde_json::json!({ "view": format!("{v:?}") }),
            }),
        };
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, state, async {
            let _ = stop_rx.await;
        }));

        let (status, head, body) = http_get(addr, "/metrics").await;
        assert_eq!(status, 200, "{head}");
        assert!(
            head.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{head}"
        );
        assert!(
            body.contains("celluler_messages_in_total{lane=\"high\"} 2\n"),
            "{body}"
        );
        assert!(body.contains("celluler_bytes_in_total{lane=\"high\"} 50\n"));
        assert!(body.contains("# TYPE celluler_time_in_relay_seconds summary\n"));

        // A later scrape sees later updates.
        metrics.msgs_in(1, 1, 1);
        let (_, _, body) = http_get(addr, "/metrics").await;
        assert!(body.contains("celluler_messages_in_total{lane=\"high\"} 3\n"));

        let (status, head, body) = http_get(addr, "/health").await;
        assert_eq!(status, 200, "{head}");
        assert!(head.contains("content-type: application/json"), "{head}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("health is JSON");
        assert_eq!(v, serde_json::json!({ "status": "ok", "links": 3 }));

        let (status, _, body) = http_get(addr, "/peers").await;
        assert_eq!(status, 200);
        assert_eq!(body, "{\"view\":\"Peers\"}\n");
        let (_, _, body) = http_get(addr, "/routes").await;
        assert_eq!(body, "{\"view\":\"Routes\"}\n");
        let (_, _, body) = http_get(addr, "/topology").await;
        let v: serde_json::Value = serde_json::from_str(&body).expect("topology is JSON");
        assert_eq!(v["relays"][1]["links"][1], "cccc");
        let (status, head, body) = http_get(addr, "/topology?format=dot").await;
        assert_eq!(status, 200);
        assert!(head.contains("content-type: text/vnd.graphviz"), "{head}");
        // Each link once, however many of its ends announced it; a relay
        // only announced of (cccc) still has its edge.
        assert_eq!(
            body,
            "graph mesh {\n  \"aaaa\" [label=\"aaaa\", style=bold];\n  \
             \"bbbb\" [label=\"bbbb\"];\n  \"aaaa\" -- \"bbbb\";\n  \
             \"bbbb\" -- \"cccc\";\n}\n"
        );
        let (status, _, body) = http_get(addr, "/topology?format=svg").await;
        assert_eq!(status, 400);
        assert!(body.contains("format=dot"), "{body}");

        let (status, _, body) = http_get(addr, "/nope").await;
        assert_eq!(status, 404);
        assert_eq!(body, NOT_FOUND_HINT);

        stop_tx.send(()).unwrap();
        let result = tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("server stops within 10 s after shutdown")
            .expect("server task did not panic");
        assert!(result.is_ok(), "{result:?}");
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "listener closed after shutdown"
        );
    }
}
