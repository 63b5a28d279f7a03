//! Active health checks: the registry probes each instance's readiness endpoint.

use crate::Registry;
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Probe every instance each interval, forever.
pub(crate) async fn run(registry: Registry) {
    let cfg = registry.config().health.clone();
    if !cfg.enabled {
        return std::future::pending().await;
    }
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_millis(cfg.timeout_ms)));
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector);
    let permits = Arc::new(Semaphore::new(cfg.max_concurrent_probes));
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut round = tokio::task::JoinSet::new();
        for target in registry.targets() {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let client = client.clone();
            let registry = registry.clone();
            let addr = target.addr;
            let timeout = Duration::from_millis(cfg.timeout_ms);
            let path = cfg.path.clone();
            round.spawn(async move {
                let passed = if target.tls {
                    // The instance accepts mutual TLS only: probe as the control
                    // plane, checking that it is the service it registered as.
                    match registry.probe_tls().map(|c| c.client(&target.service)) {
                        Some(Ok(tls)) => {
                            probe(&tls, &format!("https://{addr}{path}"), timeout).await
                        }
                        _ => false,
                    }
                } else {
                    probe(&client, &format!("http://{addr}{path}"), timeout).await
                };
                registry.record_probe(&target.id, passed);
                drop(permit);
            });
        }
        // One round at a time: a slow round delays the next instead of piling up.
        while round.join_next().await.is_some() {}
    }
}

async fn probe<C>(client: &Client<C, Empty<Bytes>>, uri: &str, timeout: Duration) -> bool
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let Ok(uri) = uri.parse::<http::Uri>() else {
        return false;
    };
    match tokio::time::timeout(timeout, client.get(uri)).await {
        Ok(Ok(res)) => res.status().is_success(),
        _ => false,
    }
}
