//! An orchestrator for the saga crash test (`tests/tests/it/saga.rs`), as its own
//! process: `saga-probe <sqlite file> <participant url> <id>...` opens the saga log
//! (resuming whatever is unfinished), starts a saga for every id not started
//! yet, waits for all of them and prints `saga <id> <status>` for each. Ids
//! starting with `bad-` carry an amount the participant refuses to charge.
//!
//! The saga: reserve (compensable), pay (the pivot), ship (retriable). Each step
//! is `POST <url>/<step>/<do|undo>` with the step's idempotency key; the test's
//! participant holds a call at the crash point while the test kills this process
//! with SIGKILL.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use shoal_core::{Error, ErrorKind, Origin};
use shoal_db::{Db, DbOptions};
use shoal_saga::{Orchestrator, RetryConfig, Saga, Status, Step, StepCtx, StepError};
use std::time::Duration;

type Http = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

#[derive(Clone)]
struct Env {
    http: Http,
    url: String,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Order {
    amount: u32,
}

/// One call to the participant: 200 is done, 409 a refusal, anything else a
/// retryable failure.
async fn call(cx: StepCtx<Env>, order: Order) -> Result<Order, StepError> {
    let body = format!(
        "{{\"saga_id\":\"{}\",\"amount\":{}}}",
        cx.saga_id, order.amount
    );
    let req = http::Request::post(format!("{}/{}/{}", cx.env.url, cx.step, cx.phase.as_str()))
        .header("idempotency-key", cx.idempotency_key())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| Error::internal("building a request").with_source(e))?;
    let resp = cx.env.http.request(req).await.map_err(|e| {
        Error::new(ErrorKind::Unavailable, Origin::Upstream, "participant").with_source(e)
    })?;
    let status = resp.status().as_u16();
    let text = resp
        .into_body()
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    match status {
        200 => Ok(order),
        409 => Err(StepError::rejected(text)),
        s => Err(StepError::Failed(Error::new(
            ErrorKind::Unavailable,
            Origin::Upstream,
            format!("participant answered {s}"),
        ))),
    }
}

fn saga() -> Result<Saga<Order, Env>, Error> {
    let retry = RetryConfig {
        max_attempts: 5,
        base_delay_ms: 10,
        max_delay_ms: 200,
        ..RetryConfig::default()
    };
    let t = Duration::from_secs(2);
    Saga::builder("order")
        .step(
            Step::new("reserve", call)
                .compensate(call)
                .retry(retry.clone())
                .timeout(t),
        )
        .step(
            Step::new("pay", call)
                .pivot()
                .retry(retry.clone())
                .timeout(t),
        )
        .step(Step::new("ship", call).retriable().retry(retry).timeout(t))
        .build()
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("saga-probe: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [file, url, ids @ ..] = args.as_slice() else {
        return Err(Error::config(
            "usage: saga-probe <sqlite file> <url> <id>...",
        ));
    };
    let db = Db::open(&DbOptions::new(format!("sqlite://{file}")), &[]).await?;
    let env = Env {
        http: Client::builder(TokioExecutor::new()).build_http(),
        url: url.clone(),
    };
    let orch = Orchestrator::builder(saga()?, env).open(&db).await?;
    println!("ready");
    for id in ids {
        let amount = if id.starts_with("bad-") { 500 } else { 50 };
        orch.start(id, Order { amount }).await?;
    }
    for id in ids {
        let status: Status = orch.wait(id).await?;
        println!(
            "saga {id} {}",
            serde_json::to_string(&status)
                .unwrap_or_default()
                .trim_matches('"')
        );
    }
    Ok(())
}
