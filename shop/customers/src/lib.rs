//! The reference shop's customers service: the profiles of the shop's users.
//!
//! - `GET /api/customers/me` answers the caller's profile `{"id","name","email"}`.
//!
//! The caller is the one the gateway verified: it passes the token's subject on as
//! `x-shoal-subject` (and strips any a client sends), so this service trusts the
//! header and checks no token itself. Without the header the answer is 401
//! `unauthenticated`; a subject without a profile is 404.
//!
//! A profile's id is the identity service's username (`alice`, `bob`, `admin`); the
//! first migration creates the table and those development seeds.

use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use shoal::{ApiError, Ctx, Migration, Service};

/// The schema and seed data, applied once per database at start.
static MIGRATIONS: &[Migration] = &[Migration::new(
    1,
    "init",
    include_str!("../migrations/001_init.sql"),
)];

/// The header the gateway puts the verified caller in (`shoal_core::headers::X_SHOAL_SUBJECT`).
const SUBJECT_HEADER: &str = "x-shoal-subject";

/// Longest subject looked up: identity usernames are short, and a longer header
/// cannot name a profile, so it is not worth a query.
const MAX_SUBJECT_LEN: usize = 128;

/// The customers service, ready to run (`service().main().await`) or to start in a test.
pub fn service() -> Service {
    Service::new("customers")
        .version(env!("CARGO_PKG_VERSION"))
        .database(MIGRATIONS)
        .routes(router())
}

fn router() -> Router {
    Router::new().route("/api/customers/me", get(me))
}

/// A profile as the API shows it.
#[derive(Debug, Serialize)]
struct Customer {
    id: String,
    name: String,
    email: String,
}

fn unauthenticated(message: &str) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::UNAUTHORIZED,
        "unauthenticated",
        message,
    )
}

/// The caller named by the gateway, or 401.
fn subject(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers
        .get(SUBJECT_HEADER)
        .ok_or_else(|| unauthenticated("no verified caller (x-shoal-subject)"))?;
    let subject = value
        .to_str()
        .map_err(|_| unauthenticated("x-shoal-subject is not text"))?
        .trim();
    if subject.is_empty() {
        return Err(unauthenticated("x-shoal-subject is empty"));
    }
    Ok(subject)
}

async fn me(ctx: Ctx, headers: HeaderMap) -> Result<Json<Customer>, ApiError> {
    let subject = subject(&headers)?;
    if subject.len() > MAX_SUBJECT_LEN {
        return Err(ApiError::not_found("no profile for this caller"));
    }
    let row = sqlx::query_as::<_, (String, String, String)>(
        "SELECT id, name, email FROM customers WHERE id = $1",
    )
    .bind(subject)
    .fetch_optional(ctx.db().pool())
    .await
    .map_err(|e| {
        tracing::error!(error = %e, "customers query failed");
        ApiError::internal("database error")
    })?;
    match row {
        Some((id, name, email)) => Ok(Json(Customer { id, name, email })),
        None => Err(ApiError::not_found(format!("no profile for {subject}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal::testing::contract::Contract;
    use shoal::testing::{self, DataDir};

    async fn start(dir: &std::path::Path) -> shoal::RunningService {
        testing::start_alone(service(), dir).await.unwrap()
    }

    async fn me_as(addr: std::net::SocketAddr, headers: &[(&str, &str)]) -> testing::Answer {
        testing::request(
            addr,
            axum::http::Method::GET,
            "/api/customers/me",
            headers,
            Vec::new(),
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn the_caller_reads_their_own_profile() {
        let dir = DataDir::new("shop-customers-me");
        let running = start(&dir).await;
        let a = me_as(running.addr(), &[("x-shoal-subject", "alice")]).await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(
            a.json(),
            serde_json::json!({"id": "alice", "name": "Alice Example", "email": "alice@example.com"})
        );
        for who in ["bob", "admin"] {
            let a = me_as(running.addr(), &[("x-shoal-subject", who)]).await;
            assert_eq!(a.status, 200, "{}", a.text());
            assert_eq!(a.json()["id"], who);
            assert!(a.json()["email"].as_str().unwrap().contains('@'));
        }
        running.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn without_a_verified_caller_it_is_401() {
        let dir = DataDir::new("shop-customers-401");
        let running = start(&dir).await;
        for headers in [
            &[][..],
            &[("x-shoal-subject", "")][..],
            &[("x-shoal-subject", "  ")][..],
        ] {
            let a = me_as(running.addr(), headers).await;
            assert_eq!(a.status, 401, "{headers:?}: {}", a.text());
            assert_eq!(a.json()["error"]["code"], "unauthenticated");
        }
        running.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn a_caller_without_a_profile_is_404() {
        let dir = DataDir::new("shop-customers-404");
        let running = start(&dir).await;
        let long = "x".repeat(10_000);
        for who in ["carol", long.as_str()] {
            let a = me_as(running.addr(), &[("x-shoal-subject", who)]).await;
            assert_eq!(a.status, 404, "{}", a.text());
            assert_eq!(a.json()["error"]["code"], "not_found");
        }
        running.shutdown().await.unwrap();
    }

    /// The gateway's /details aggregate reads /api/customers/me as the caller.
    #[tokio::test]
    async fn keeps_its_contract_with_the_gateway() {
        let dir = DataDir::new("shop-customers-contract");
        let running = start(&dir).await;
        let contract = Contract::load(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../contracts/gateway--customers.json"
        ));
        assert_eq!(contract.provider, "customers");
        // Both states hold in the seed data: alice has a profile, nobody has none.
        contract
            .verify(running.addr(), |_state| async {})
            .await
            .unwrap();
        running.shutdown().await.unwrap();
    }
}
