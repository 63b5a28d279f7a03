#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::*;
use shoal_bus::{SharedBus, SubscribeOptions, TopicSpec};
use shoal_core::{Error, ErrorKind, Origin};
use shoal_db::{Db, DbOptions};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

async fn fresh_db(tag: &str) -> Db {
    let dir = std::env::temp_dir().join(format!(
        "shoal-saga-{tag}-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("saga.db").display());
    Db::open(&DbOptions::new(url), &[]).await.unwrap()
}

/// A participant: applies each idempotency key once, and records every call and
/// every effect in order. It can be told to refuse or fail a step.
#[derive(Clone, Default)]
struct Participant {
    inner: Arc<Mutex<Log>>,
}

#[derive(Default)]
struct Log {
    /// Every call, in order: (key, attempt).
    calls: Vec<(String, u32)>,
    /// Effects applied, once per key.
    applied: Vec<String>,
    /// Calls per key that got through to the effect.
    per_key: HashMap<String, u32>,
    /// Steps that refuse.
    refuse: Vec<String>,
    /// Steps that fail (retryable) this many more times.
    fail: HashMap<String, u32>,
    /// Steps that fail for good, not retryable.
    break_for_good: Vec<String>,
}

impl Participant {
    fn call(&self, cx: &StepCtx<Participant>) -> Result<(), StepError> {
        let mut l = self.inner.lock().unwrap();
        let key = cx.idempotency_key();
        l.calls.push((key.clone(), cx.attempt));
        let id = format!("{}/{}", cx.step, cx.phase.as_str());
        if cx.phase == Phase::Do && l.refuse.contains(&cx.step) {
            return Err(StepError::rejected(format!("{} refused", cx.step)));
        }
        if l.break_for_good.contains(&id) {
            return Err(StepError::Failed(Error::new(
                ErrorKind::Protocol,
                Origin::Upstream,
                "broken",
            )));
        }
        if let Some(n) = l.fail.get_mut(&id) {
            if *n > 0 {
                *n -= 1;
                return Err(StepError::Failed(Error::unavailable("flaky")));
            }
        }
        let count = l.per_key.entry(key).or_insert(0);
        *count += 1;
        if *count == 1 {
            l.applied.push(id);
        }
        Ok(())
    }

    fn applied(&self) -> Vec<String> {
        self.inner.lock().unwrap().applied.clone()
    }
}

/// The data threaded through the test sagas: which steps ran.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq)]
struct Trail {
    done: Vec<String>,
}

fn fast() -> RetryConfig {
    RetryConfig {
        max_attempts: 3,
        base_delay_ms: 1,
        max_delay_ms: 5,
        ..RetryConfig::default()
    }
}

fn step(name: &str) -> StepBuilder<Trail, Participant> {
    let n = name.to_string();
    Step::new(name, move |cx: StepCtx<Participant>, mut t: Trail| {
        let n = n.clone();
        async move {
            cx.env.call(&cx)?;
            t.done.push(n);
            Ok(t)
        }
    })
}

fn undo() -> impl Fn(StepCtx<Participant>, Trail) -> StepFuture<Trail> + Send + Sync + 'static {
    |cx: StepCtx<Participant>, t: Trail| {
        Box::pin(async move {
            cx.env.call(&cx)?;
            Ok(t)
        })
    }
}

/// reserve (compensable), authorize (compensable), capture (pivot), confirm (retriable).
fn order_saga() -> Saga<Trail, Participant> {
    Saga::builder("order")
        .step(step("reserve").compensate(undo()).retry(fast()))
        .step(step("authorize").compensate(undo()).retry(fast()))
        .step(step("capture").pivot().retry(fast()))
        .step(step("confirm").retriable().retry(fast()))
        .build()
        .unwrap()
}

#[test]
fn definitions_with_kinds_out_of_order_are_refused() {
    let p = |s: &str| step(s).pivot();
    let c = |s: &str| step(s).compensate(undo());
    let r = |s: &str| step(s).retriable();
    let err = |b: SagaBuilder<Trail, Participant>| b.build().unwrap_err().to_string();

    let e = err(Saga::builder("x").step(p("a")).step(c("b")));
    assert!(
        e.contains("step b has a compensation but comes after pivot step a"),
        "{e}"
    );
    let e = err(Saga::builder("x").step(r("a")).step(p("b")));
    assert!(
        e.contains("step b is a pivot after retriable step a"),
        "{e}"
    );
    let e = err(Saga::builder("x").step(p("a")).step(p("b")));
    assert!(e.contains("one point of no return"), "{e}");
    let e = err(Saga::builder("x").step(c("a")).step(c("a")));
    assert!(e.contains("two steps are named a"), "{e}");
    let e = err(Saga::builder("x"));
    assert!(e.contains("has 0 steps"), "{e}");
    let e = err(Saga::builder("bad name").step(c("a")));
    assert!(e.contains("saga name"), "{e}");
    let e = err(Saga::builder("x").step(c("a").retry(RetryConfig {
        max_attempts: 0,
        ..RetryConfig::default()
    })));
    assert!(e.contains("max_attempts"), "{e}");

    // Every well-formed shape builds.
    Saga::builder("x")
        .step(c("a"))
        .step(c("b"))
        .build()
        .unwrap();
    Saga::builder("x")
        .step(c("a"))
        .step(p("b"))
        .step(r("c"))
        .build()
        .unwrap();
    Saga::builder("x")
        .step(p("a"))
        .step(r("b"))
        .build()
        .unwrap();
    Saga::builder("x")
        .step(c("a"))
        .step(r("b"))
        .step(r("c"))
        .build()
        .unwrap();
}

#[tokio::test]
async fn a_saga_runs_every_step_in_order_and_records_each() {
    let db = fresh_db("happy").await;
    let part = Participant::default();
    let orch = Orchestrator::builder(order_saga(), part.clone())
        .open(&db)
        .await
        .unwrap();
    assert!(orch.start("o-1", Trail::default()).await.unwrap());
    assert_eq!(orch.wait("o-1").await.unwrap(), Status::Completed);
    assert_eq!(
        part.applied(),
        ["reserve/do", "authorize/do", "capture/do", "confirm/do"]
    );
    let s = orch.status("o-1").await.unwrap().unwrap();
    assert_eq!(s.status, Status::Completed);
    assert_eq!(s.step, 4);
    assert_eq!(
        s.data["done"],
        serde_json::json!(["reserve", "authorize", "capture", "confirm"])
    );
    let events: Vec<_> = s
        .history
        .iter()
        .map(|h| format!("{}:{}", h.step, h.event))
        .collect();
    assert_eq!(
        events,
        [
            "order:started",
            "reserve:done",
            "authorize:done",
            "capture:done",
            "confirm:done"
        ]
    );
    // A second start with the same id starts nothing.
    assert!(!orch.start("o-1", Trail::default()).await.unwrap());
    assert_eq!(part.applied().len(), 4);
    orch.shutdown().await;
}

#[tokio::test]
async fn a_refusal_compensates_the_steps_before_it_in_reverse_order() {
    let db = fresh_db("refuse").await;
    let part = Participant::default();
    part.inner.lock().unwrap().refuse.push("capture".into());
    let orch = Orchestrator::builder(order_saga(), part.clone())
        .open(&db)
        .await
        .unwrap();
    orch.start("o-2", Trail::default()).await.unwrap();
    assert_eq!(orch.wait("o-2").await.unwrap(), Status::Compensated);
    assert_eq!(
        part.applied(),
        [
            "reserve/do",
            "authorize/do",
            "authorize/undo",
            "reserve/undo"
        ]
    );
    let s = orch.status("o-2").await.unwrap().unwrap();
    assert_eq!(s.error.as_deref(), Some("capture: capture refused"));
    let events: Vec<_> = s
        .history
        .iter()
        .map(|h| format!("{}:{}", h.step, h.event))
        .collect();
    assert_eq!(
        events,
        [
            "order:started",
            "reserve:done",
            "authorize:done",
            "capture:rejected",
            "authorize:compensated",
            "reserve:compensated"
        ]
    );
    orch.shutdown().await;
}

#[tokio::test]
async fn an_uncertain_failure_compensates_the_failed_step_too() {
    let db = fresh_db("uncertain").await;
    let part = Participant::default();
    part.inner
        .lock()
        .unwrap()
        .break_for_good
        .push("authorize/do".into());
    let orch = Orchestrator::builder(order_saga(), part.clone())
        .open(&db)
        .await
        .unwrap();
    orch.start("o-3", Trail::default()).await.unwrap();
    assert_eq!(orch.wait("o-3").await.unwrap(), Status::Compensated);
    // Not retryable: one call only; then authorize's compensation, then reserve's.
    let calls = part.inner.lock().unwrap().calls.clone();
    let keys: Vec<_> = calls.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "o-3:reserve",
            "o-3:authorize",
            "o-3:authorize:undo",
            "o-3:reserve:undo"
        ]
    );
    orch.shutdown().await;
}

#[tokio::test]
async fn retryable_failures_are_retried_under_the_same_key() {
    let db = fresh_db("retry").await;
    let part = Participant::default();
    part.inner
        .lock()
        .unwrap()
        .fail
        .insert("authorize/do".into(), 2);
    let orch = Orchestrator::builder(order_saga(), part.clone())
        .open(&db)
        .await
        .unwrap();
    orch.start("o-4", Trail::default()).await.unwrap();
    assert_eq!(orch.wait("o-4").await.unwrap(), Status::Completed);
    let calls = part.inner.lock().unwrap().calls.clone();
    let auth: Vec<_> = calls.iter().filter(|(k, _)| k == "o-4:authorize").collect();
    assert_eq!(auth.len(), 3, "{calls:?}");
    assert_eq!(auth.iter().map(|(_, a)| *a).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(
        part.applied(),
        ["reserve/do", "authorize/do", "capture/do", "confirm/do"]
    );
    orch.shutdown().await;
}

#[tokio::test]
async fn a_step_that_runs_past_its_timeout_is_retried_then_compensated() {
    let db = fresh_db("timeout").await;
    let part = Participant::default();
    let slow = Step::new("slow", |cx: StepCtx<Participant>, t: Trail| async move {
        cx.env.call(&cx)?;
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok(t)
    })
    .compensate(undo())
    .retry(fast())
    .timeout(Duration::from_millis(30));
    let saga = Saga::builder("slow")
        .step(step("first").compensate(undo()))
        .step(slow)
        .build()
        .unwrap();
    let orch = Orchestrator::builder(saga, part.clone())
        .open(&db)
        .await
        .unwrap();
    orch.start("s-1", Trail::default()).await.unwrap();
    assert_eq!(orch.wait("s-1").await.unwrap(), Status::Compensated);
    let calls = part.inner.lock().unwrap().calls.clone();
    assert_eq!(calls.iter().filter(|(k, _)| k == "s-1:slow").count(), 3);
    // The slow step may have taken effect: it is compensated, then the first.
    assert_eq!(
        part.applied(),
        ["first/do", "slow/do", "slow/undo", "first/undo"]
    );
    let s = orch.status("s-1").await.unwrap().unwrap();
    assert!(s.error.unwrap().contains("took longer than"));
    orch.shutdown().await;
}

#[tokio::test]
async fn a_failing_compensation_is_marked_stuck_and_retried_until_it_succeeds() {
    let db = fresh_db("stuck").await;
    let part = Participant::default();
    {
        let mut l = part.inner.lock().unwrap();
        l.refuse.push("capture".into());
        l.fail.insert("reserve/undo".into(), 6);
    }
    let orch = Orchestrator::builder(order_saga(), part.clone())
        .open(&db)
        .await
        .unwrap();
    orch.start("o-5", Trail::default()).await.unwrap();
    assert_eq!(orch.wait("o-5").await.unwrap(), Status::Compensated);
    let s = orch.status("o-5").await.unwrap().unwrap();
    assert!(!s.stuck, "unmarked once it succeeded");
    assert!(
        s.history
            .iter()
            .any(|h| h.event == "stuck" && h.step == "reserve"),
        "{:?}",
        s.history
    );
    assert_eq!(
        part.applied(),
        [
            "reserve/do",
            "authorize/do",
            "authorize/undo",
            "reserve/undo"
        ]
    );
    orch.shutdown().await;
}

#[tokio::test]
async fn an_orchestrator_reopened_resumes_unfinished_sagas_without_repeating_effects() {
    let db = fresh_db("resume").await;
    let part = Participant::default();
    // A gate holds the second step of every saga until the first orchestrator is gone.
    let gate = Arc::new(tokio::sync::Notify::new());
    let entered = Arc::new(tokio::sync::Semaphore::new(0));
    let saga = |gate: Option<(Arc<tokio::sync::Notify>, Arc<tokio::sync::Semaphore>)>| {
        let held = Step::new("held", move |cx: StepCtx<Participant>, mut t: Trail| {
            let gate = gate.clone();
            async move {
                cx.env.call(&cx)?;
                if let Some((g, e)) = gate {
                    e.add_permits(1);
                    g.notified().await;
                }
                t.done.push("held".into());
                Ok(t)
            }
        })
        .compensate(undo());
        Saga::builder("resume")
            .step(step("first").compensate(undo()))
            .step(held)
            .step(step("last").pivot())
            .build()
            .unwrap()
    };
    let first = Orchestrator::builder(saga(Some((gate.clone(), entered.clone()))), part.clone())
        .open(&db)
        .await
        .unwrap();
    for i in 0..20 {
        first
            .start(&format!("r-{i}"), Trail::default())
            .await
            .unwrap();
    }
    // Every saga is inside "held" (its effect applied, its end not recorded).
    let _all = entered.acquire_many(20).await.unwrap();
    first.shutdown().await;
    drop(first);

    let second = Orchestrator::builder(saga(None), part.clone())
        .open(&db)
        .await
        .unwrap();
    for i in 0..20 {
        assert_eq!(
            second.wait(&format!("r-{i}")).await.unwrap(),
            Status::Completed
        );
        let s = second.status(&format!("r-{i}")).await.unwrap().unwrap();
        assert_eq!(s.data["done"], serde_json::json!(["first", "held", "last"]));
    }
    // "held" ran twice per saga, under one key: applied once. (Under a new key
    // the repeat would count as a second effect: 80 in all.)
    let calls = part.inner.lock().unwrap().calls.clone();
    assert_eq!(
        calls.iter().filter(|(k, _)| k.ends_with(":held")).count(),
        40
    );
    assert_eq!(part.inner.lock().unwrap().per_key.len(), 60);
    assert_eq!(part.applied().len(), 60);
    second.shutdown().await;
}

#[tokio::test]
async fn starts_past_the_limit_are_refused_as_overloaded() {
    let db = fresh_db("limit").await;
    let part = Participant::default();
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    let wait = Step::new("wait", move |_cx: StepCtx<Participant>, t: Trail| {
        let g = g.clone();
        async move {
            g.notified().await;
            Ok(t)
        }
    })
    .pivot()
    .timeout(Duration::from_secs(30));
    let saga = Saga::builder("limit").step(wait).build().unwrap();
    let orch = Orchestrator::builder(saga, part)
        .max_running(2)
        .open(&db)
        .await
        .unwrap();
    orch.start("a", Trail::default()).await.unwrap();
    orch.start("b", Trail::default()).await.unwrap();
    let e = orch.start("c", Trail::default()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Overloaded);
    assert!(e.is_retryable());
    let e = orch.start("", Trail::default()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    gate.notify_waiters();
    orch.shutdown().await;
}

// --- command steps, over a real embedded broker ---------------------------------

struct Served {
    addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    broker: shoal_broker::Broker,
}

async fn broker() -> Served {
    let dir = std::env::temp_dir().join(format!(
        "shoal-saga-broker-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    let metrics = shoal_telemetry::Metrics::new("test");
    let broker = shoal_broker::Broker::open(&dir, shoal_broker::BrokerConfig::default(), &metrics)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let b = broker.clone();
    tokio::spawn(async move {
        let _ = shoal_broker::serve(listener, b, async {
            let _ = rx.await;
        })
        .await;
    });
    Served { addr, stop, broker }
}

/// A participant on the bus: takes `pay` commands, charges once per idempotency
/// key (counted in `charged`), refuses amounts over 100, answers after `delay`,
/// and answers every command twice (the orchestrator must take the first and
/// drop the second).
async fn payments(bus: SharedBus, charged: Arc<Mutex<HashMap<String, u32>>>, delay: Duration) {
    bus.create_topic(&TopicSpec::new("payments.commands", 1))
        .await
        .unwrap();
    let mut c = bus
        .subscribe("payments.commands", "payments", SubscribeOptions::default())
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Ok(d) = c.next().await {
            let m = &d.message;
            let key = m
                .headers
                .get("idempotency-key")
                .cloned()
                .unwrap_or_default();
            let amount: u32 = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
            let outcome = if !key.ends_with(":undo") && amount > 100 {
                Outcome::Rejected("amount over limit".into())
            } else {
                charged.lock().unwrap().entry(key.clone()).or_insert(1);
                Outcome::Ok(
                    if key.ends_with(":undo") {
                        "refunded"
                    } else {
                        "charged"
                    }
                    .into(),
                )
            };
            tokio::time::sleep(delay).await;
            let (topic, first) = reply(m, outcome).unwrap();
            let again = first.clone().with_id(uuid::Uuid::now_v7().to_string());
            bus.publish(&topic, vec![first, again]).await.unwrap();
            c.ack(&d).await.unwrap();
        }
    });
}

fn stray(saga_id: &str, step: &str, phase: &str) -> shoal_bus::Message {
    shoal_bus::Message {
        topic: "payments.commands".into(),
        partition: 0,
        offset: 0,
        id: format!("stray-{saga_id}-{step}-{phase}"),
        key: None,
        headers: [
            (headers::SAGA_ID, saga_id),
            (headers::SAGA_STEP, step),
            (headers::SAGA_PHASE, phase),
            (headers::REPLY_TO, "pay.replies"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
        payload: bytes::Bytes::new(),
        timestamp_ms: 0,
    }
}

#[tokio::test]
async fn command_steps_take_their_reply_and_ignore_duplicates_and_strays() {
    let served = broker().await;
    let bus: SharedBus = Arc::new(
        shoal_broker::EmbeddedBus::connect(served.addr)
            .await
            .unwrap(),
    );
    let charged = Arc::new(Mutex::new(HashMap::new()));
    payments(bus.clone(), charged.clone(), Duration::from_millis(300)).await;

    #[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
    struct Pay {
        amount: u32,
        receipt: Option<String>,
        shipped: bool,
    }
    let command =
        |_cx: &StepCtx<()>, d: &Pay| Ok(Command::new("payments.commands", d.amount.to_string()));
    let pay = Step::command("pay", command, |mut d: Pay, r: &Reply| {
        d.receipt = Some(String::from_utf8_lossy(&r.payload).into_owned());
        Ok(d)
    })
    .compensate_with_command(command, |d: Pay, _r: &Reply| Ok(d))
    .timeout(Duration::from_secs(5));
    let ship = Step::new("ship", |_cx: StepCtx<()>, mut d: Pay| async move {
        d.shipped = true;
        Ok(d)
    })
    .pivot();
    let saga = Saga::builder("pay").step(pay).step(ship).build().unwrap();
    let registry = shoal_telemetry::Metrics::new("test");
    let orch = Orchestrator::builder(saga, ())
        .bus(bus.clone(), "pay.replies")
        .metrics(SagaMetrics::register(&registry))
        .open(&fresh_db("commands").await)
        .await
        .unwrap();

    orch.start(
        "p-1",
        Pay {
            amount: 40,
            ..Pay::default()
        },
    )
    .await
    .unwrap();
    orch.start(
        "p-2",
        Pay {
            amount: 400,
            ..Pay::default()
        },
    )
    .await
    .unwrap();
    // While p-1 waits for its reply: refusals for a step it has not reached, for
    // the compensation of the step it is at, and for a saga that does not exist.
    // Were any taken for p-1's awaited reply, p-1 would compensate.
    for m in [
        stray("p-1", "1", "do"),
        stray("p-1", "0", "undo"),
        stray("p-9", "0", "do"),
    ] {
        let (topic, r) = reply(&m, Outcome::Rejected("stray".into())).unwrap();
        bus.publish(&topic, vec![r]).await.unwrap();
    }
    assert_eq!(orch.wait("p-1").await.unwrap(), Status::Completed);
    assert_eq!(orch.wait("p-2").await.unwrap(), Status::Compensated);
    let s = orch.status("p-1").await.unwrap().unwrap();
    assert_eq!(s.data["receipt"], "charged");
    assert_eq!(s.data["shipped"], true);
    let s = orch.status("p-2").await.unwrap().unwrap();
    assert_eq!(s.error.as_deref(), Some("pay: amount over limit"));
    // Refused: nothing to undo, so no refund was asked for.
    let keys: Vec<String> = charged.lock().unwrap().keys().cloned().collect();
    assert_eq!(keys, ["p-1:pay"]);
    // Three strays and one duplicate per answered command.
    let ignored = "shoal_saga_ignored_replies_total{service=\"test\",saga=\"pay\"} 5";
    assert!(
        shoal_tests_eventually(|| registry.render().contains(ignored)).await,
        "{}",
        registry.render()
    );
    orch.shutdown().await;
    let _ = served.stop.send(());
    served.broker.close().await;
}

async fn shoal_tests_eventually(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..100 {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}
