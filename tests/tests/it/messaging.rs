//! Messaging through the SDK, on each bus backend: the transactional outbox survives
//! a publisher that cannot publish and a restart, the idempotent inbox gives each
//! message one effect through a full replay, and a failing handler has its message
//! delivered again.

use axum::Router;
use bytes::Bytes;
use http::{Method, StatusCode};
use shoal::bus::{
    BoxFuture, Bus, OutgoingMessage, Published, SharedBus, StartAt, SubscribeOptions, TopicSpec,
};
use shoal::messaging::{Handler, HandlerFuture, Message};
use shoal::testing::{get as http_get, request};
use shoal::{Ctx, Migration, Service};
use shoal_core::{Error, ErrorKind, Origin};
use shoal_tests::{eventually, temp_dir};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A bus whose publishes fail while `down` is set: a publisher cut off from its
/// broker. Everything else passes through to the real bus.
struct Switch {
    inner: SharedBus,
    down: AtomicBool,
}

impl Bus for Switch {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn create_topic<'a>(&'a self, spec: &'a TopicSpec) -> BoxFuture<'a, Result<(), Error>> {
        self.inner.create_topic(spec)
    }
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        batch: Vec<OutgoingMessage>,
    ) -> BoxFuture<'a, Result<Vec<Published>, Error>> {
        if self.down.load(Ordering::SeqCst) {
            return Box::pin(async {
                Err(Error::new(
                    ErrorKind::Unavailable,
                    Origin::Upstream,
                    "the broker is unreachable",
                ))
            });
        }
        self.inner.publish(topic, batch)
    }
    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        options: SubscribeOptions,
    ) -> BoxFuture<'a, Result<Box<dyn shoal::bus::Consumer>, Error>> {
        self.inner.subscribe(topic, group, options)
    }
    fn seek<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        to: StartAt,
    ) -> BoxFuture<'a, Result<(), Error>> {
        self.inner.seek(topic, group, to)
    }
    fn lag<'a>(&'a self, topic: &'a str, group: &'a str) -> BoxFuture<'a, Result<u64, Error>> {
        self.inner.lag(topic, group)
    }
}

static ORDERS: &[Migration] = &[Migration::new(
    1,
    "orders",
    "CREATE TABLE orders (id TEXT PRIMARY KEY)",
)];

static LEDGER: &[Migration] = &[Migration::new(
    1,
    "ledger",
    "CREATE TABLE ledger (order_id TEXT PRIMARY KEY, n BIGINT NOT NULL)",
)];

/// The orders service: an order and its event commit together.
fn orders(bus: SharedBus, topic: &str) -> Service {
    let topic = topic.to_string();
    let routes = Router::new().route(
        "/orders/{id}",
        axum::routing::post(
            move |ctx: Ctx, axum::extract::Path(id): axum::extract::Path<String>| {
                let topic = topic.clone();
                async move {
                    let err = |e: shoal::sqlx::Error| {
                        shoal::ApiError::from(Error::internal("orders").with_source(e))
                    };
                    let mut tx = ctx.db().pool().begin().await.map_err(err)?;
                    shoal::sqlx::query("INSERT INTO orders (id) VALUES ($1)")
                        .bind(&id)
                        .execute(&mut *tx)
                        .await
                        .map_err(err)?;
                    let m = OutgoingMessage::new(Bytes::from(id.clone()))
                        .with_id(format!("order-{id}"))
                        .with_key(id.clone());
                    ctx.outbox().enqueue(&mut tx, &topic, &m).await?;
                    tx.commit().await.map_err(err)?;
                    Ok::<_, shoal::ApiError>("placed")
                }
            },
        ),
    );
    Service::new("orders")
        .database(ORDERS)
        .bus(bus)
        .outbox()
        .routes(routes)
}

/// Counts each order's effects: a second effect of one message would show as 2.
struct Ledger {
    fail_once: String,
    failed: AtomicU32,
}

impl Handler for Ledger {
    fn handle<'a>(
        &'a self,
        _ctx: &'a Ctx,
        message: &'a Message,
        tx: &'a mut shoal::sqlx::AnyConnection,
    ) -> HandlerFuture<'a> {
        Box::pin(async move {
            let order = String::from_utf8_lossy(&message.payload).into_owned();
            shoal::sqlx::query(
                "INSERT INTO ledger (order_id, n) VALUES ($1, 1)
                 ON CONFLICT (order_id) DO UPDATE SET n = ledger.n + 1",
            )
            .bind(&order)
            .execute(&mut *tx)
            .await
            .map_err(|e| Error::internal("ledger").with_source(e))?;
            // Fail after writing: the write must be rolled back with the failure.
            if order == self.fail_once && self.failed.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err(Error::internal("the ledger is having a bad moment"));
            }
            Ok(())
        })
    }
}

async fn ledger_rows(ctx: &Ctx) -> Vec<(String, i64)> {
    shoal::sqlx::query_as("SELECT order_id, n FROM ledger ORDER BY order_id")
        .fetch_all(ctx.db().pool())
        .await
        .unwrap()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `registry`: the ledger finds the bus from its config (the control plane says
/// where its broker is) instead of being handed `bus`.
async fn outbox_and_inbox_give_each_order_exactly_one_effect(
    bus: SharedBus,
    topic: String,
    registry: Option<String>,
) {
    let dir = temp_dir("outbox");
    let switch = Arc::new(Switch {
        inner: bus.clone(),
        down: AtomicBool::new(true),
    });
    bus.create_topic(&TopicSpec::new(&topic, 2)).await.unwrap();

    // 1. The orders service cannot reach the broker: orders still commit, their
    //    events wait in the outbox.
    let svc = shoal::testing::start_alone(orders(switch.clone(), &topic), &dir)
        .await
        .unwrap();
    for i in 0..10 {
        let a = request(
            svc.addr(),
            Method::POST,
            &format!("/orders/o{i}"),
            &[],
            Bytes::new(),
        )
        .await
        .unwrap();
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    }
    let addr = svc.addr();
    assert!(
        eventually(Duration::from_secs(10), || async {
            let m = http_get(addr, "/metrics")
                .await
                .map(|a| a.text())
                .unwrap_or_default();
            metric(&m, "shoal_outbox_backlog") == 10.0
        })
        .await,
        "the backlog never showed the 10 waiting events"
    );
    assert_eq!(bus.lag(&topic, "ledger").await.unwrap_or(0), 0);
    // 2. It stops with its events unpublished (as a crash after commit would leave
    //    them), and starts again with the broker reachable: the relay sends them.
    svc.shutdown().await.unwrap();
    switch.down.store(false, Ordering::SeqCst);
    let svc = shoal::testing::start_alone(orders(switch.clone(), &topic), &dir)
        .await
        .unwrap();

    // 3. The ledger consumes them through its inbox.
    let ledger_dir = temp_dir("ledger");
    let handler = Arc::new(Ledger {
        fail_once: "o7".into(),
        failed: AtomicU32::new(0),
    });
    let options = SubscribeOptions {
        ack_timeout_ms: 2_000,
        backoff_initial_ms: 50,
        backoff_max_ms: 200,
        ..SubscribeOptions::default()
    };
    let mut ledger = Service::new("ledger").database(LEDGER).consume_with(
        &topic,
        Some("ledger"),
        options,
        handler.clone(),
    );
    ledger = match registry {
        Some(url) => ledger.env([("SHOAL_REGISTRY_URL", url)]),
        None => ledger.bus(bus.clone()),
    };
    let ledger = shoal::testing::start_alone(ledger, &ledger_dir)
        .await
        .unwrap();
    let want: Vec<(String, i64)> = (0..10).map(|i| (format!("o{i}"), 1)).collect();
    let ctx = ledger.ctx().clone();
    assert!(
        eventually(Duration::from_secs(20), || async {
            ledger_rows(&ctx).await == want
        })
        .await,
        "ledger: {:?}",
        ledger_rows(&ctx).await
    );
    assert!(
        handler.failed.load(Ordering::SeqCst) >= 2,
        "o7 failed once, then passed"
    );

    // 4. The whole topic again (a replay): every message is a duplicate now, and
    //    the inbox keeps each at one effect.
    bus.seek(&topic, "ledger", StartAt::Earliest).await.unwrap();
    let laddr = ledger.addr();
    assert!(
        eventually(Duration::from_secs(20), || async {
            let m = http_get(laddr, "/metrics")
                .await
                .map(|a| a.text())
                .unwrap_or_default();
            metric(&m, "shoal_inbox_duplicates_total") >= 10.0
        })
        .await,
        "the replay was not recognised"
    );
    assert_eq!(ledger_rows(&ctx).await, want);
    let m = http_get(svc.addr(), "/metrics").await.unwrap().text();
    assert_eq!(metric(&m, "shoal_outbox_backlog"), 0.0, "{m}");
    ledger.shutdown().await.unwrap();
    svc.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_jetstream_outbox_and_inbox_give_each_order_exactly_one_effect() {
    let options = shoal_bus_nats::NatsOptions {
        prefix: Some(shoal_testkit::nats::unique_prefix()),
        ..Default::default()
    };
    let bus: SharedBus = Arc::new(
        shoal_bus_nats::JetStreamBus::connect(shoal_testkit::nats::url(), options)
            .await
            .unwrap(),
    );
    outbox_and_inbox_give_each_order_exactly_one_effect(bus, "orders.placed".into(), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_embedded_broker_outbox_and_inbox_give_each_order_exactly_one_effect() {
    let cp = shoal_tests::control_plane().await;
    let addr = shoal_discovery::RegistryClient::new(&cp.url())
        .unwrap()
        .broker_addr()
        .await
        .unwrap();
    let bus: SharedBus = Arc::new(
        shoal_broker::EmbeddedBus::connect(addr.as_str())
            .await
            .unwrap(),
    );
    outbox_and_inbox_give_each_order_exactly_one_effect(
        bus,
        "orders.placed".into(),
        Some(cp.url()),
    )
    .await;
    cp.stop().await;
}

/// The outbox across a real crash: a service process commits orders while its
/// broker is down, is killed with SIGKILL with their events still in its outbox,
/// and at its next start publishes every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_committed_before_a_kill_9_are_published_after_the_restart() {
    use crate::broker::{free_port, ControlPlane};
    use std::collections::HashSet;
    shoal_tests::build_binaries();
    let mut cp = ControlPlane::new("outbox-crash");
    cp.start();
    let bus = cp.bus().await;
    let data = temp_dir("outbox-probe");
    let port = free_port();
    let probe_addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let registry = format!("http://{}", cp.http);
    let start_probe = || {
        shoal_tests::ChildGuard(
            std::process::Command::new(shoal_tests::bin_dir().join("outbox-probe"))
                .env("SHOAL_REGISTRY_URL", &registry)
                .env("SHOAL_REGISTER", "false")
                // Stable, as `shoal up` gives a restarted replica: its relay takes
                // the outbox's turn back at once instead of waiting out the lease.
                .env("SHOAL_INSTANCE_ID", "probe-1")
                .env("SHOAL_LISTEN", probe_addr.to_string())
                .env("SHOAL_DATA_DIR", &data)
                .env("SHOAL_LOG_LEVEL", "warn")
                .stdin(std::process::Stdio::null())
                .spawn()
                .expect("start outbox-probe"),
        )
    };
    let place = |id: String| async move {
        let a = request(
            probe_addr,
            Method::POST,
            &format!("/orders/{id}"),
            &[],
            Bytes::new(),
        )
        .await
        .unwrap();
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        id
    };

    let mut probe = start_probe();
    assert!(
        shoal_tests::answers_ok(probe_addr, "/health/ready", Duration::from_secs(30)).await,
        "the probe did not start"
    );
    let mut placed = HashSet::new();
    for i in 0..50 {
        placed.insert(place(format!("a{i}")).await);
    }
    // The broker goes away: orders still commit, their events wait in the outbox.
    cp.kill();
    for i in 0..20 {
        placed.insert(place(format!("b{i}")).await);
    }
    probe.0.kill().unwrap();
    probe.0.wait().unwrap();
    let waiting = {
        let db = shoal::Db::open(
            &shoal::DbOptions::new(format!("sqlite://{}", data.join("probe.db").display())),
            &[],
        )
        .await
        .unwrap();
        let (n,): (i64,) = shoal::sqlx::query_as("SELECT COUNT(*) FROM _shoal_outbox")
            .fetch_one(db.pool())
            .await
            .unwrap();
        db.close().await;
        n
    };
    assert!(
        waiting >= 20,
        "only {waiting} events were waiting at the kill"
    );

    // Broker back, probe back: the relay publishes what waited.
    cp.start();
    let bus = {
        drop(bus);
        cp.bus().await
    };
    let _probe = start_probe();
    let mut consumer = bus
        .subscribe("probe.orders", "check", SubscribeOptions::default())
        .await
        .unwrap();
    let mut seen = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !placed.is_subset(&seen) {
        let d = match tokio::time::timeout_at(deadline, consumer.next()).await {
            Ok(Ok(d)) => d,
            Ok(Err(e)) if e.is_retryable() => continue,
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => panic!(
                "{} of {} committed orders never published",
                placed.difference(&seen).count(),
                placed.len()
            ),
        };
        seen.insert(String::from_utf8_lossy(&d.message.payload).into_owned());
        consumer.ack(&d).await.unwrap();
    }
}
