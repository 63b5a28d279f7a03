//! `GET /v1/breakers`: every process's circuit breakers in one list.
//!
//! The control plane asks each registered instance (`GET /ops/breakers`) when an
//! operator looks, instead of having processes report: a breaker's state changes in
//! milliseconds under load and only its owner knows it now, and asking costs nothing
//! while nobody looks. An instance that does not answer in time is named in
//! `unreachable` rather than failing the whole answer: the operator is most likely
//! looking because something is failing.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use shoal_core::resilience::BreakerList;
use shoal_core::{Error, ErrorKind, Origin};
use shoal_registry::Registry;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Where each process lists its breakers.
const OPS_PATH: &str = "/ops/breakers";
/// How long one instance may take to answer, connect included.
const INSTANCE_TIMEOUT: Duration = Duration::from_millis(500);
/// Largest answer read from one instance.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;
/// Most instances asked at once (as many as the registry probes at once).
const MAX_CONCURRENT: usize = 64;

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

#[derive(Clone)]
struct Fanout {
    registry: Registry,
    http: HttpClient,
}

/// The breaker overview's route, to be merged into the control plane's router.
pub(crate) fn router(registry: Registry) -> Router {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(INSTANCE_TIMEOUT));
    connector.set_nodelay(true);
    let http = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector);
    Router::new()
        .route("/v1/breakers", get(list))
        .with_state(Fanout { registry, http })
}

async fn list(State(f): State<Fanout>) -> Json<BreakerList> {
    Json(f.collect().await)
}

impl Fanout {
    /// Ask every instance in the catalog, merge, and sort.
    async fn collect(&self) -> BreakerList {
        let targets: Vec<shoal_core::registry::Instance> = self
            .registry
            .catalog()
            .services
            .into_iter()
            .flat_map(|s| s.instances)
            .collect();
        let permits = Arc::new(Semaphore::new(MAX_CONCURRENT));
        let mut tasks = JoinSet::new();
        // Kept apart from the tasks so an instance whose task panicked is still named.
        let mut ids = HashMap::new();
        for instance in targets {
            let id = instance.id.clone();
            let addr = instance.addr;
            let http = self.http.clone();
            // A mutual-mode instance is asked over mTLS, as the control plane.
            let tls = shoal_tls::serves_mutual_tls(&instance.metadata).then(|| {
                self.registry
                    .probe_tls()
                    .map(|c| c.client(&instance.service))
            });
            let permits = permits.clone();
            let task = tasks.spawn(async move {
                // The semaphore is never closed; the permit is held for the whole ask.
                let _permit = permits.acquire_owned().await;
                let answer = async {
                    match tls {
                        None => fetch(&http, &format!("http://{addr}{OPS_PATH}"), addr).await,
                        Some(Some(Ok(c))) => {
                            fetch(&c, &format!("https://{addr}{OPS_PATH}"), addr).await
                        }
                        Some(_) => Err(Error::unavailable(format!(
                            "{addr} serves mutual TLS only and the control plane has no identity"
                        ))),
                    }
                };
                match tokio::time::timeout(INSTANCE_TIMEOUT, answer).await {
                    Ok(answer) => answer,
                    Err(_) => Err(Error::new(
                        ErrorKind::Timeout,
                        Origin::Upstream,
                        format!("no answer within {} ms", INSTANCE_TIMEOUT.as_millis()),
                    )),
                }
            });
            ids.insert(task.id(), id);
        }
        let mut out = BreakerList::default();
        while let Some(done) = tasks.join_next_with_id().await {
            let (task, answer) = match done {
                Ok((task, answer)) => (task, answer),
                Err(e) => (
                    e.id(),
                    Err(Error::internal("breaker fan-out task failed").with_source(e)),
                ),
            };
            let id = ids.remove(&task).unwrap_or_default();
            match answer {
                Ok(list) => out.breakers.extend(list.breakers),
                Err(e) => {
                    tracing::debug!(instance = %id, error = %e, "breakers not listed");
                    out.unreachable.push(id);
                }
            }
        }
        out.breakers.sort_by(|a, b| {
            (&a.owner, &a.dependency, &a.route).cmp(&(&b.owner, &b.dependency, &b.route))
        });
        out.unreachable.sort();
        out
    }
}

/// One instance's breakers. A 404 means the process has no breaker endpoint (a
/// service not built with the SDK), so it has no breakers to list.
async fn fetch<C>(
    http: &Client<C, Empty<Bytes>>,
    uri: &str,
    addr: SocketAddr,
) -> Result<BreakerList, Error>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let upstream = |kind, msg: String| Error::new(kind, Origin::Upstream, msg);
    let uri: http::Uri = uri
        .parse()
        .map_err(|e| Error::internal(format!("breaker url for {addr}")).with_source(e))?;
    let res = http.get(uri).await.map_err(|e| {
        upstream(ErrorKind::Unavailable, format!("{addr} unreachable")).with_source(e)
    })?;
    let status = res.status();
    if status == http::StatusCode::NOT_FOUND {
        return Ok(BreakerList::default());
    }
    if !status.is_success() {
        return Err(upstream(
            ErrorKind::Protocol,
            format!("{addr} answered {status}"),
        ));
    }
    let body = Limited::new(res.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|e| {
            upstream(
                ErrorKind::Unavailable,
                format!("reading breakers of {addr}"),
            )
            .with_source(std::io::Error::other(e.to_string()))
        })?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| {
        upstream(
            ErrorKind::Protocol,
            format!("{addr}: unexpected breaker list"),
        )
        .with_source(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http::{Request, StatusCode};
    use shoal_core::registry::Registration;
    use shoal_core::resilience::{BreakerInfo, BreakerState};
    use shoal_registry::RegistryConfig;
    use tower::ServiceExt;

    fn breaker(owner: &str, dependency: &str, route: Option<&str>) -> BreakerInfo {
        BreakerInfo {
            owner: owner.into(),
            dependency: dependency.into(),
            route: route.map(Into::into),
            policy: "default".into(),
            state: BreakerState::Closed,
            calls: 3,
            failure_rate: 0.0,
            slow_call_rate: 0.0,
            since_ms: 10,
        }
    }

    /// A process whose `/ops/breakers` is `app`.
    async fn process(app: Router) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    fn answering(list: BreakerList) -> Router {
        Router::new().route(OPS_PATH, get(move || async move { Json(list) }))
    }

    fn register(r: &Registry, id: &str, addr: SocketAddr) {
        r.register(Registration {
            service: id.split('-').next().unwrap().into(),
            version: "1.0.0".into(),
            addr,
            id: Some(id.into()),
            pid: None,
            metadata: Default::default(),
            ttl_ms: Some(60_000),
        })
        .unwrap();
    }

    #[tokio::test]
    async fn fans_out_merges_sorted_and_names_the_unreachable() {
        let registry = Registry::new(RegistryConfig::default()).unwrap();
        let orders = process(answering(BreakerList {
            breakers: vec![
                breaker("orders-1", "payment", Some("/api/pay")),
                breaker("orders-1", "payment", None),
                breaker("orders-1", "inventory", None),
            ],
            unreachable: vec![],
        }))
        .await;
        let cart = process(answering(BreakerList {
            breakers: vec![breaker("cart-1", "orders", None)],
            unreachable: vec![],
        }))
        .await;
        let slow = process(Router::new().route(
            OPS_PATH,
            get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Json(BreakerList::default())
            }),
        ))
        .await;
        let garbage = process(Router::new().route(OPS_PATH, get(|| async { "<html>" }))).await;
        let failing = process(Router::new().route(
            OPS_PATH,
            get(|| async { StatusCode::INTERNAL_SERVER_ERROR }),
        ))
        .await;
        // Not built with the SDK: no breaker endpoint, so no breakers.
        let plain = process(Router::new()).await;
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        register(&registry, "orders-1", orders);
        register(&registry, "cart-1", cart);
        register(&registry, "search-1", slow);
        register(&registry, "search-2", garbage);
        register(&registry, "search-3", failing);
        register(&registry, "reviews-1", plain);
        register(&registry, "gone-1", closed);

        let app = crate::router(
            registry,
            crate::FaultTable::new(),
            shoal_telemetry::Metrics::new("control-plane"),
        );
        let start = std::time::Instant::now();
        let res = app
            .oneshot(Request::get("/v1/breakers").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(res.status(), StatusCode::OK);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let list: BreakerList = serde_json::from_slice(&body).unwrap();
        let keys: Vec<_> = list
            .breakers
            .iter()
            .map(|b| (b.owner.as_str(), b.dependency.as_str(), b.route.as_deref()))
            .collect();
        assert_eq!(
            keys,
            [
                ("cart-1", "orders", None),
                ("orders-1", "inventory", None),
                ("orders-1", "payment", None),
                ("orders-1", "payment", Some("/api/pay")),
            ]
        );
        assert_eq!(
            list.unreachable,
            ["gone-1", "search-1", "search-2", "search-3"]
        );
    }

    #[tokio::test]
    async fn an_empty_catalog_lists_nothing() {
        let registry = Registry::new(RegistryConfig::default()).unwrap();
        let list = Fanout {
            registry: registry.clone(),
            http: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        }
        .collect()
        .await;
        assert_eq!(list, BreakerList::default());
        assert_eq!(serde_json::to_string(&list).unwrap(), r#"{"breakers":[]}"#);
    }
}
