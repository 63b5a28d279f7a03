//! A service for the outbox crash test (`tests/tests/it/messaging.rs`): each
//! `POST /orders/{id}` commits an order row and its `probe.orders` event in one
//! transaction; the SDK's relay publishes the events. The test kills it with
//! SIGKILL while events wait in its outbox, and checks that none is lost.

use axum::extract::Path;
use axum::Router;
use shoal::bus::{OutgoingMessage, TopicSpec};
use shoal::{ApiError, Ctx, Error, Migration, Service};

static MIGRATIONS: &[Migration] = &[Migration::new(
    1,
    "orders",
    "CREATE TABLE orders (id TEXT PRIMARY KEY)",
)];

/// The topic the probe publishes to.
const TOPIC: &str = "probe.orders";

async fn place(ctx: Ctx, Path(id): Path<String>) -> Result<&'static str, ApiError> {
    let err = |e: shoal::sqlx::Error| ApiError::from(Error::internal("orders").with_source(e));
    let mut tx = ctx.db().pool().begin().await.map_err(err)?;
    shoal::sqlx::query("INSERT INTO orders (id) VALUES ($1)")
        .bind(&id)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
    let event = OutgoingMessage::new(id.clone().into_bytes())
        .with_id(format!("order-{id}"))
        .with_key(id);
    ctx.outbox().enqueue(&mut tx, TOPIC, &event).await?;
    tx.commit().await.map_err(err)?;
    Ok("placed")
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    Service::new("probe")
        .database(MIGRATIONS)
        .topic(TopicSpec::new(TOPIC, 2))
        .outbox()
        .routes(Router::new().route("/orders/{id}", axum::routing::post(place)))
        .main()
        .await
}
