//! Registry, discovery, SDK and gateway working together in one process, over real
//! HTTP on 127.0.0.1.

use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::{Method, StatusCode};
use shoal::testing::{get as http_get, request};
use shoal::{Ctx, RunningService, Service};
use shoal_core::registry::Registration;
use shoal_discovery::{
    Balancer, Caller, CallerConfig, Discovery, RegistryClient, ServiceClient, Strategy,
};
use shoal_resilience::{Resilience, ResilienceConfig};
use shoal_tests::{answers_ok, control_plane, control_plane_at, fast_registry, gateway, temp_dir};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn echo_routes() -> Router {
    Router::new()
        .route("/who", get(|ctx: Ctx| async move { ctx.instance_id().to_string() }))
        .route(
            "/headers",
            get(|headers: http::HeaderMap| async move {
                let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                axum::Json(serde_json::json!({"traceparent": h("traceparent"), "request_id": h("x-request-id")}))
            }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(400)).await;
                "done"
            }),
        )
}

async fn start(name: &str, registry: &str, routes: Router) -> RunningService {
    Service::new(name)
        .version("1.2.3")
        .routes(routes)
        .env([
            ("SHOAL_REGISTRY_URL", registry),
            ("SHOAL_DEREGISTER_GRACE_MS", "50"),
            ("SHOAL_TTL_MS", "3000"),
        ])
        .start()
        .await
        .expect("service starts")
}

fn reg(service: &str, port: u16) -> Registration {
    Registration {
        service: service.into(),
        version: "1".into(),
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
        id: None,
        pid: None,
        metadata: Default::default(),
        ttl_ms: None,
    }
}

#[tokio::test]
async fn registry_rejects_bad_payloads_with_a_clear_400_and_keeps_its_state() {
    let cp = control_plane().await;
    let cases: &[(&str, &str)] = &[
        ("{not json", "invalid registration"),
        (r#"{"service":"a","version":"1","addr":"127.0.0.1:9"}"#, ""),
        (
            r#"{"service":"catalog","version":1,"addr":"127.0.0.1:9"}"#,
            "invalid type",
        ),
        (
            r#"{"service":"catalog","addr":"127.0.0.1:9"}"#,
            "missing field `version`",
        ),
        (
            r#"{"service":"catalog","version":"1","addr":"127.0.0.1:9","colour":"red"}"#,
            "unknown field `colour`",
        ),
        (
            r#"{"service":"catalog","version":"1","addr":"not-an-addr"}"#,
            "invalid",
        ),
        (
            r#"{"service":"catalog","version":"1","addr":"127.0.0.1:0"}"#,
            "addr:",
        ),
        (
            r#"{"service":"Cat_alog","version":"1","addr":"127.0.0.1:9"}"#,
            "service:",
        ),
        (
            r#"{"service":"catalog","version":"1","addr":"127.0.0.1:9","ttl_ms":5}"#,
            "ttl_ms:",
        ),
        ("[]", "invalid registration"),
    ];
    let mut accepted = 0;
    for (body, needle) in cases {
        let a = request(
            cp.addr,
            Method::POST,
            "/v1/instances",
            &[("content-type", "application/json")],
            body.to_string(),
        )
        .await
        .unwrap();
        if a.status == StatusCode::CREATED {
            // The one valid payload ("a" is a fine service name).
            accepted += 1;
            continue;
        }
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{body}: {}", a.text());
        let v = a.json();
        assert_eq!(v["error"]["code"], "invalid_registration", "{body}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{body}: {msg}");
    }
    assert_eq!(accepted, 1);
    // Oversized: 413, JSON.
    let big = format!(
        r#"{{"service":"catalog","version":"{}","addr":"127.0.0.1:9"}}"#,
        "x".repeat(70_000)
    );
    let a = request(cp.addr, Method::POST, "/v1/instances", &[], big)
        .await
        .unwrap();
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(a.json()["error"]["code"], "payload_too_large");
    // Unknown ids and query parameters.
    let a = request(
        cp.addr,
        Method::PUT,
        "/v1/instances/nope/heartbeat",
        &[],
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.json()["error"]["code"], "unknown_instance");
    let a = http_get(cp.addr, "/v1/services?index=abc").await.unwrap();
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.json()["error"]["code"], "bad_request");
    // Only the valid registration is there.
    let v = http_get(cp.addr, "/v1/services").await.unwrap().json();
    assert_eq!(v["services"].as_array().unwrap().len(), 1);
    assert_eq!(v["services"][0]["name"], "a");
    cp.stop().await;
}

#[tokio::test]
async fn a_watch_sees_register_and_deregister_within_a_second() {
    let cp = control_plane().await;
    let client = RegistryClient::new(&cp.url()).unwrap();
    let discovery = Discovery::start(client.clone());
    assert!(discovery.loaded(Duration::from_secs(5)).await);
    // The watch is a long poll already waiting: the change is pushed, not polled for.
    let done = client.register(&reg("catalog", 4000)).await.unwrap();
    assert!(
        discovery
            .wait_until(Duration::from_secs(1), |c| c.instances("catalog").len()
                == 1)
            .await,
        "register not seen within 1 s"
    );
    client.deregister(&done.id).await.unwrap();
    assert!(
        discovery
            .wait_until(Duration::from_secs(1), |c| c
                .instances("catalog")
                .is_empty())
            .await,
        "deregister not seen within 1 s"
    );
    cp.stop().await;
}

#[tokio::test]
async fn load_spreads_across_two_replicas_client_side_and_through_the_gateway() {
    let cp = control_plane().await;
    let a = start("echo", &cp.url(), echo_routes()).await;
    let b = start("echo", &cp.url(), echo_routes()).await;
    let discovery = Discovery::start(RegistryClient::new(&cp.url()).unwrap());
    assert!(
        discovery
            .wait_until(Duration::from_secs(5), |c| c.instances("echo").len() == 2)
            .await
    );

    // Client side, round robin: an exact split.
    let caller = Caller::new(
        Balancer::new(discovery.clone(), Strategy::RoundRobin),
        CallerConfig::default(),
        Resilience::new(
            ResilienceConfig::default(),
            "test",
            Duration::from_secs(10),
            None,
        )
        .unwrap(),
        None,
    );
    let client = ServiceClient::new(caller, "echo");
    let mut counts: HashMap<String, u32> = HashMap::new();
    for _ in 0..100 {
        let r = client
            .get("/who")
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap();
        *counts.entry(r.text()).or_default() += 1;
    }
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert!(counts.values().all(|&n| n == 50), "{counts:?}");

    // Server side, through the gateway (power of two choices).
    let gw = gateway(&cp.url(), &[("/who", "echo")]).await;
    assert!(answers_ok(gw.addr, "/health/ready", Duration::from_secs(5)).await);
    let mut counts: HashMap<String, u32> = HashMap::new();
    for _ in 0..200 {
        let r = http_get(gw.addr, "/who").await.unwrap();
        assert_eq!(r.status, 200);
        *counts.entry(r.text()).or_default() += 1;
    }
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert!(counts.values().all(|&n| n >= 60), "uneven: {counts:?}");
    gw.stop().await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    cp.stop().await;
}

#[tokio::test]
async fn a_failing_health_check_removes_an_instance_and_recovery_restores_it() {
    let cp = control_plane().await;
    let ok = Arc::new(AtomicBool::new(true));
    let flag = ok.clone();
    let svc = Service::new("flaky")
        .routes(echo_routes())
        .readiness("switch", move |_ctx| {
            let flag = flag.clone();
            async move {
                if flag.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err("switched off".to_string())
                }
            }
        })
        .env([("SHOAL_REGISTRY_URL", cp.url())])
        .start()
        .await
        .unwrap();
    let discovery = Discovery::start(RegistryClient::new(&cp.url()).unwrap());
    assert!(
        discovery
            .wait_until(Duration::from_secs(5), |c| c
                .instances("flaky")
                .iter()
                .any(|i| i.healthy))
            .await
    );
    let gw = gateway(&cp.url(), &[("/who", "flaky")]).await;
    assert!(answers_ok(gw.addr, "/who", Duration::from_secs(5)).await);

    ok.store(false, Ordering::SeqCst);
    let ready = http_get(svc.addr(), "/health/ready").await.unwrap();
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["checks"]["switch"], "switched off");
    assert!(
        discovery
            .wait_until(Duration::from_secs(5), |c| c
                .instances("flaky")
                .iter()
                .all(|i| !i.healthy))
            .await,
        "unhealthy instance still in discovery"
    );
    let a = http_get(gw.addr, "/who").await.unwrap();
    assert_eq!(a.status, 503);
    assert_eq!(a.json()["error"]["code"], "no_healthy_upstream");
    let a = http_get(gw.addr, "/health/ready").await.unwrap();
    assert_eq!(a.status, 503);

    ok.store(true, Ordering::SeqCst);
    assert!(
        discovery
            .wait_until(Duration::from_secs(5), |c| c
                .instances("flaky")
                .iter()
                .any(|i| i.healthy))
            .await,
        "recovered instance not back"
    );
    assert!(answers_ok(gw.addr, "/who", Duration::from_secs(5)).await);
    gw.stop().await;
    svc.shutdown().await.unwrap();
    cp.stop().await;
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests_and_deregisters() {
    let cp = control_plane().await;
    let svc = start("drainer", &cp.url(), echo_routes()).await;
    let addr = svc.addr();
    let client = RegistryClient::new(&cp.url()).unwrap();
    assert_eq!(
        client
            .catalog(None, Duration::ZERO)
            .await
            .unwrap()
            .instances("drainer")
            .len(),
        1
    );

    let slow = tokio::spawn(async move { http_get(addr, "/slow").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    svc.shutdown().await.unwrap();
    let a = slow.await.unwrap().unwrap();
    assert_eq!(a.status, 200, "in-flight request was cut");
    assert_eq!(a.text(), "done");
    assert!(client
        .catalog(None, Duration::ZERO)
        .await
        .unwrap()
        .instances("drainer")
        .is_empty());
    assert!(
        http_get(addr, "/who").await.is_err(),
        "still accepting after shutdown"
    );
    cp.stop().await;
}

#[tokio::test]
async fn request_id_and_trace_travel_through_gateway_and_service_client() {
    let cp = control_plane().await;
    let back = start("back", &cp.url(), echo_routes()).await;
    let front_routes = Router::new().route(
        "/front",
        get(|ctx: Ctx| async move {
            let r = ctx
                .client("back")
                .get("/headers")
                .send()
                .await
                .map_err(shoal::ApiError::from)?;
            Ok::<_, shoal::ApiError>(axum::Json(
                r.json::<serde_json::Value>()
                    .map_err(shoal::ApiError::from)?,
            ))
        }),
    );
    let front = start("front", &cp.url(), front_routes).await;
    let gw = gateway(&cp.url(), &[("/front", "front")]).await;
    assert!(answers_ok(gw.addr, "/health/ready", Duration::from_secs(5)).await);
    assert!(
        front
            .ctx()
            .discovery()
            .wait_until(Duration::from_secs(5), |c| !c.instances("back").is_empty())
            .await
    );

    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let a = request(
        gw.addr,
        Method::GET,
        "/front",
        &[("traceparent", trace), ("x-request-id", "req-42")],
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.headers["x-request-id"], "req-42");
    assert_eq!(a.headers["x-shoal-served-by"], "front@1.2.3");
    let seen = a.json();
    assert_eq!(seen["request_id"], "req-42");
    let tp = seen["traceparent"].as_str().unwrap();
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{tp}"
    );
    assert!(
        !tp.contains("00f067aa0ba902b7"),
        "span id must change at each hop: {tp}"
    );

    // No traceparent and no request id: both are made, and the answer carries the id.
    let a = http_get(gw.addr, "/front").await.unwrap();
    let id = a.headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(a.json()["request_id"], id.as_str());
    gw.stop().await;
    front.shutdown().await.unwrap();
    back.shutdown().await.unwrap();
    cp.stop().await;
}

#[tokio::test]
async fn metrics_follow_the_spec_and_errors_are_json() {
    let cp = control_plane().await;
    let svc = Service::new("metered")
        .routes(echo_routes())
        .env([
            ("SHOAL_REGISTRY_URL", cp.url()),
            ("SHOAL_BODY_LIMIT_BYTES", "1024".into()),
        ])
        .start()
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(http_get(svc.addr(), "/who").await.unwrap().status, 200);
    }
    let m = http_get(svc.addr(), "/metrics").await.unwrap().text();
    assert!(
        m.contains(r#"shoal_http_server_requests_total{service="metered",route="/who",method="GET",status="200"} 3"#),
        "{m}"
    );
    assert!(
        m.lines().any(
            |l| l.starts_with("shoal_http_server_request_duration_seconds_bucket{")
                && l.contains(r#"route="/who""#)
                && l.contains(r#"le="+Inf""#)
                && l.ends_with(" 3")
        ),
        "{m}"
    );

    let a = http_get(svc.addr(), "/nope").await.unwrap();
    assert_eq!(a.status, 404);
    assert_eq!(a.json()["error"]["code"], "not_found");
    let a = request(svc.addr(), Method::POST, "/who", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(a.status, 405);
    assert_eq!(a.json()["error"]["code"], "method_not_allowed");

    let gw = gateway(&cp.url(), &[("/who", "metered"), ("/gone", "nobody")]).await;
    let a = http_get(gw.addr, "/elsewhere").await.unwrap();
    assert_eq!(a.status, 404);
    assert_eq!(a.json()["error"]["code"], "not_found");
    let a = http_get(gw.addr, "/gone").await.unwrap();
    assert_eq!(a.status, 503);
    assert_eq!(a.json()["error"]["code"], "no_healthy_upstream");
    let a = http_get(gw.addr, "/who/../admin").await.unwrap();
    assert_eq!(a.status, 400);
    let a = request(gw.addr, Method::POST, "/who", &[], vec![b'x'; 70_000])
        .await
        .unwrap();
    assert_eq!(a.status, 413);
    assert_eq!(a.json()["error"]["code"], "payload_too_large");
    gw.stop().await;
    svc.shutdown().await.unwrap();
    cp.stop().await;
}

#[tokio::test]
async fn config_mistakes_stop_a_service_at_start_naming_the_key() {
    let err = Service::new("cfg")
        .env([("SHOAL_REGISTER", "false"), ("SHOAL_LISTN", "127.0.0.1:0")])
        .start()
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("listn"), "{err}");
    let err = Service::new("cfg")
        .env([
            ("SHOAL_REGISTER", "false"),
            ("SHOAL_BODY_LIMIT_BYTES", "lots"),
        ])
        .start()
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("body_limit_bytes") || err.contains("invalid type"),
        "{err}"
    );
    // Mistakes in a config file name the key (and the file).
    let dir = temp_dir("cfg");
    let file = dir.join("svc.toml");
    for (toml, needles) in [
        (
            "register = false\n[database]\nurll = \"x\"\n",
            &["urll", "svc.toml"][..],
        ),
        // A policy that cannot work, and one that names a policy nobody defined.
        (
            "register = false\n[resilience.policies.p]\nretry = { max_attempts = 0 }\n",
            &["resilience.policies.p.retry.max_attempts"][..],
        ),
        (
            "register = false\n[resilience.dependencies.payment]\npolicy = \"fast\"\n",
            &["resilience.dependencies.payment.policy"][..],
        ),
    ] {
        std::fs::write(&file, toml).unwrap();
        let err = Service::new("cfg")
            .config_file(&file)
            .env(Vec::<(String, String)>::new())
            .start()
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(needles.iter().all(|n| err.contains(n)), "{err}");
    }
}

/// A service's own settings, as a shop service declares them.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ProbeSettings {
    deadline_ms: u64,
    greeting: String,
}

impl Default for ProbeSettings {
    fn default() -> Self {
        Self {
            deadline_ms: 30_000,
            greeting: "hello".into(),
        }
    }
}

#[tokio::test]
async fn a_service_reads_its_own_settings_and_refuses_wrong_ones() {
    let read = |env: Vec<(&'static str, &'static str)>| async move {
        let mut env = env;
        env.push(("SHOAL_REGISTER", "false"));
        Service::new("cfg")
            .settings::<ProbeSettings>()
            .env(env)
            .start()
            .await
    };
    let running = read(vec![]).await.unwrap();
    let s = running.ctx().settings::<ProbeSettings>();
    assert_eq!((s.deadline_ms, s.greeting.as_str()), (30_000, "hello"));
    running.shutdown().await.unwrap();

    let running = read(vec![("SHOAL_SETTINGS__DEADLINE_MS", "5000")])
        .await
        .unwrap();
    assert_eq!(running.ctx().settings::<ProbeSettings>().deadline_ms, 5000);
    running.shutdown().await.unwrap();

    for (key, value, needle) in [
        ("SHOAL_SETTINGS__DEADLNE_MS", "5", "deadlne_ms"),
        ("SHOAL_SETTINGS__DEADLINE_MS", "soon", "settings"),
    ] {
        let err = read(vec![(key, value)]).await.err().unwrap().to_string();
        assert!(err.contains(needle), "{err}");
    }
    // A service without settings refuses them rather than ignoring a typo.
    let err = Service::new("cfg")
        .env([("SHOAL_REGISTER", "false"), ("SHOAL_SETTINGS__X", "1")])
        .start()
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("takes no settings"), "{err}");
}

#[tokio::test]
async fn a_restarted_control_plane_still_knows_heartbeating_instances() {
    let data = temp_dir("cp-restart");
    let cp = control_plane_at(
        "127.0.0.1:0".parse().unwrap(),
        fast_registry(),
        data.clone(),
    )
    .await;
    let addr = cp.addr;
    let svc = start("sticky", &cp.url(), echo_routes()).await;
    let id = svc.ctx().instance_id().to_string();
    cp.stop().await;
    let cp = control_plane_at(addr, fast_registry(), data).await;
    // Known at once, from the state file, before any heartbeat or re-registration.
    let v = http_get(cp.addr, &format!("/v1/instances/{id}"))
        .await
        .unwrap();
    assert_eq!(v.status, 200, "{}", v.text());
    assert_eq!(v.json()["addr"], svc.addr().to_string());
    svc.shutdown().await.unwrap();
    cp.stop().await;
}

#[tokio::test]
async fn the_gateway_skips_an_instance_that_refuses_connections() {
    let cp = control_plane().await;
    // Probes off: the dead instance stays listed, as it would between a crash and
    // the next failed probe.
    let mut reg_cfg = fast_registry();
    reg_cfg.health.enabled = false;
    let cp2 = control_plane_at("127.0.0.1:0".parse().unwrap(), reg_cfg, temp_dir("cp2")).await;
    cp.stop().await;
    let live = start("pair", &cp2.url(), echo_routes()).await;
    // A registered address where nothing listens.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    RegistryClient::new(&cp2.url())
        .unwrap()
        .register(&reg("pair", dead_port))
        .await
        .unwrap();
    let gw = gateway(&cp2.url(), &[("/who", "pair")]).await;
    assert!(answers_ok(gw.addr, "/health/ready", Duration::from_secs(5)).await);
    for _ in 0..40 {
        let a = http_get(gw.addr, "/who").await.unwrap();
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.text(), live.ctx().instance_id());
    }
    gw.stop().await;
    live.shutdown().await.unwrap();
    cp2.stop().await;
}

/// Counts placed orders per customer; the read side of the event-sourced test service.
struct OrdersPerCustomer;

impl shoal::events::Projection for OrdersPerCustomer {
    fn name(&self) -> &str {
        "orders_per_customer"
    }

    fn apply<'a>(
        &'a self,
        tx: &'a mut shoal::sqlx::AnyConnection,
        event: &'a shoal::events::RecordedEvent,
    ) -> shoal::events::ProjectionFuture<'a> {
        Box::pin(async move {
            let customer = event.data["customer"].as_str().unwrap_or("?").to_string();
            shoal::sqlx::query(
                "INSERT INTO orders_per_customer (customer, n) VALUES ($1, 1)
                 ON CONFLICT (customer) DO UPDATE SET n = orders_per_customer.n + 1",
            )
            .bind(customer)
            .execute(&mut *tx)
            .await
            .map_err(|e| shoal::Error::internal("read model").with_source(e))?;
            Ok(())
        })
    }

    fn reset<'a>(
        &'a self,
        tx: &'a mut shoal::sqlx::AnyConnection,
    ) -> shoal::events::ProjectionFuture<'a> {
        Box::pin(async move {
            shoal::sqlx::query("DELETE FROM orders_per_customer")
                .execute(&mut *tx)
                .await
                .map_err(|e| shoal::Error::internal("read model").with_source(e))?;
            Ok(())
        })
    }
}

static ORDER_MIGRATIONS: &[shoal::Migration] = &[shoal::Migration::new(
    1,
    "read model",
    "CREATE TABLE orders_per_customer (customer TEXT PRIMARY KEY, n BIGINT NOT NULL)",
)];

#[tokio::test]
async fn an_event_sourced_service_on_sqlite_appends_through_ctx_and_its_projection_follows() {
    event_sourced_service(None).await;
}

/// The same service, unchanged, on its own PostgreSQL database: one setting.
#[tokio::test]
async fn an_event_sourced_service_on_postgres_appends_through_ctx_and_its_projection_follows() {
    event_sourced_service(Some(shoal_testkit::postgres::fresh_database().await)).await;
}

async fn event_sourced_service(database_url: Option<String>) {
    use shoal::events::{ExpectedVersion, NewEvent};
    let dir = temp_dir("es-service");
    let env: Vec<(&str, String)> = database_url
        .map(|url| ("SHOAL_DATABASE__URL", url))
        .into_iter()
        .collect();
    let routes = Router::new()
        .route(
            "/place/{customer}",
            axum::routing::post(
                |ctx: Ctx, axum::extract::Path(customer): axum::extract::Path<String>| async move {
                    let e =
                        NewEvent::new("OrderPlaced", 1, &serde_json::json!({"customer": customer}))
                            .map_err(shoal::ApiError::from)?;
                    let a = ctx
                        .events()
                        .append(
                            &format!("order-{}", next_order()),
                            ExpectedVersion::NoStream,
                            vec![e],
                        )
                        .await
                        .map_err(shoal::ApiError::from)?;
                    Ok::<_, shoal::ApiError>(a.position.to_string())
                },
            ),
        )
        .route(
            "/count/{customer}",
            get(
                |ctx: Ctx, axum::extract::Path(customer): axum::extract::Path<String>| async move {
                    let n: Option<i64> = shoal::sqlx::query_scalar(
                        "SELECT n FROM orders_per_customer WHERE customer = $1",
                    )
                    .bind(customer)
                    .fetch_optional(ctx.db().pool())
                    .await
                    .map_err(|e| {
                        shoal::ApiError::from(shoal::Error::internal("read").with_source(e))
                    })?;
                    Ok::<_, shoal::ApiError>(n.unwrap_or(0).to_string())
                },
            ),
        );
    let svc = shoal::testing::start_alone(
        Service::new("orders")
            .env(env)
            .database(ORDER_MIGRATIONS)
            .event_store(shoal::events::Upcasters::new())
            .projection(Arc::new(OrdersPerCustomer))
            .routes(routes),
        &dir,
    )
    .await
    .unwrap();
    for _ in 0..3 {
        let a = request(svc.addr(), Method::POST, "/place/alice", &[], Bytes::new())
            .await
            .unwrap();
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    }
    request(svc.addr(), Method::POST, "/place/bob", &[], Bytes::new())
        .await
        .unwrap();
    let addr = svc.addr();
    let count = move |who: &'static str| async move {
        http_get(addr, &format!("/count/{who}"))
            .await
            .map(|a| a.text())
            .unwrap_or_default()
    };
    assert!(
        shoal_tests::eventually(Duration::from_secs(5), || async {
            count("alice").await == "3" && count("bob").await == "1"
        })
        .await,
        "alice {}, bob {}",
        count("alice").await,
        count("bob").await
    );
    let metrics = http_get(svc.addr(), "/metrics").await.unwrap().text();
    assert!(
        metrics.contains("shoal_eventstore_projection_lag{"),
        "{metrics}"
    );
    svc.shutdown().await.unwrap();

    // An event store needs the service's database: refused at start, saying so.
    let err = shoal::testing::start_alone(
        Service::new("nodb").event_store(shoal::events::Upcasters::new()),
        &dir,
    )
    .await
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("Service::database"), "{err}");
}

/// A fresh order number for the test service.
fn next_order() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::SeqCst)
}
