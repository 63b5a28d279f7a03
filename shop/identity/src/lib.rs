//! The reference shop's identity service: who may call the shop, proven by access
//! tokens it signs and the gateway verifies.
//!
//! - `POST /auth/token` (JSON) exchanges credentials for a token:
//!   `{"grant_type":"password","username","password"}` for people,
//!   `{"grant_type":"client_credentials","client_id","client_secret"}` for machines.
//!   200 `{"access_token","token_type":"Bearer","expires_in"}`; 401 `invalid_grant`
//!   (the same answer, after the same work, for an unknown account and a wrong
//!   password); 400 `unsupported_grant_type` or `validation_failed`; 429
//!   `too_many_attempts` with `Retry-After` once an account or a source address had
//!   too many failures in the window (then even the right password is refused, or the
//!   limit would not stop guessing).
//! - `GET /.well-known/jwks.json`: the public keys tokens are checked with, the
//!   signing key first, then replaced keys whose tokens may still be valid.
//! - `POST /internal/keys/rotate` (Bearer token with scope `admin`, checked by the
//!   service itself against its own keys): a new signing key, answered as `{"kid"}`.
//!
//! Tokens are ES256 JWTs (`sub`, `scope`, `iss`, `aud`, `iat`, `exp`, `jti`) signed
//! with keys from shoal-auth's [`shoal_auth::KeyRing`], kept in the service's database
//! so restarts and replicas sign with the same key. Passwords are argon2id hashes.
//! Development seeds, made at first start: users `alice`/`alice-pass`,
//! `bob`/`bob-pass` (scope `customer`), `admin`/`admin-pass` (scope `admin`); client
//! `shop-operator`/`operator-secret` (scope `admin`). Settings: [`Settings`].

mod keys;
mod limiter;
mod passwords;
mod settings;

#[cfg(test)]
mod tests;

pub use settings::{HashCost, LoginLimits, Settings};

use axum::extract::State;
use axum::http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, PRAGMA, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use keys::{db_error, now_ms, KeyStore};
use limiter::{Key, Limiter};
use passwords::Passwords;
use serde::Serialize;
use serde_json::{json, Map, Value};
use shoal::{ApiError, Ctx, Db, Migration, Service};
use shoal_auth::TokenError;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The schema, applied once per database at start. Seed accounts are not in it: their
/// hashes are made at first start, so no hash (and no password) sits in the binary.
static MIGRATIONS: &[Migration] = &[Migration::new(
    1,
    "init",
    include_str!("../migrations/001_init.sql"),
)];

/// A development account: name, password (or client secret), scope.
type Seed = (&'static str, &'static str, &'static str);

/// Development users.
const SEED_USERS: &[Seed] = &[
    ("alice", "alice-pass", "customer"),
    ("bob", "bob-pass", "customer"),
    ("admin", "admin-pass", "admin"),
];
/// Development clients.
const SEED_CLIENTS: &[Seed] = &[("shop-operator", "operator-secret", "admin")];

/// Longest username or client id, in bytes.
const MAX_NAME_BYTES: usize = 128;
/// Longest password or client secret, in bytes: argon2 takes any length, but hashing
/// a megabyte-long "password" is work an attacker should not get for free.
const MAX_SECRET_BYTES: usize = 1024;

/// How long a client or cache may reuse the JWKS. Short: a rotation must reach every
/// verifier well within the margin the old key stays published.
const JWKS_CACHE_CONTROL: &str = "public, max-age=60";

/// The identity service, ready to run (`service().main().await`) or to start in a test.
pub fn service() -> Service {
    Service::new("identity")
        .version(env!("CARGO_PKG_VERSION"))
        .database(MIGRATIONS)
        .settings::<settings::Checked>()
        // At start, before serving: the seeds, the keys (the first one made on the
        // first start). An instance that cannot sign stops instead of serving.
        .setup(|ctx: Ctx| async move {
            let ready = Ready::init(&ctx)
                .await
                .map_err(|e| shoal::Error::internal(format!("identity setup: {}", e.message)))?;
            Ok(router(Arc::new(ready)))
        })
}

fn router(state: Arc<Ready>) -> Router {
    Router::new()
        .route("/auth/token", post(token))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/internal/keys/rotate", post(rotate))
        .with_state(state)
}

/// The service's state, made by the setup hook: it needs the database and the
/// settings, which exist only once the service is starting.
struct Ready {
    settings: Settings,
    passwords: Passwords,
    limiter: Limiter,
    keys: KeyStore,
}

impl Ready {
    async fn init(ctx: &Ctx) -> Result<Self, ApiError> {
        let settings = ctx.settings::<settings::Checked>().0.clone();
        let params = settings
            .password_hash
            .params()
            .map_err(ApiError::internal)?;
        let passwords = Passwords::new(params, settings.max_concurrent_hashes).await?;
        if settings.seed_accounts {
            seed(ctx.db(), &passwords).await?;
        }
        let keys = KeyStore::open(ctx.db(), &settings).await?;
        let limiter = Limiter::new(
            Duration::from_secs(settings.login.window_s),
            settings.login.max_tracked_keys,
        );
        Ok(Self {
            settings,
            passwords,
            limiter,
            keys,
        })
    }
}

/// Create the development accounts when their table is empty. `ON CONFLICT DO
/// NOTHING`: replicas starting together on an empty database seed once between them.
async fn seed(db: &Db, passwords: &Passwords) -> Result<(), ApiError> {
    // Static SQL per table (sqlx refuses built strings, and rightly).
    let tables: [(&str, &str, &str, &[Seed]); 2] = [
        (
            "users",
            "SELECT count(*) FROM users",
            "INSERT INTO users (username, password_hash, scope, created_ms) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (username) DO NOTHING",
            SEED_USERS,
        ),
        (
            "clients",
            "SELECT count(*) FROM clients",
            "INSERT INTO clients (client_id, secret_hash, scope, created_ms) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (client_id) DO NOTHING",
            SEED_CLIENTS,
        ),
    ];
    for (table, count, insert, seeds) in tables {
        let (n,) = sqlx::query_as::<_, (i64,)>(count)
            .fetch_one(db.pool())
            .await
            .map_err(db_error)?;
        if n > 0 {
            continue;
        }
        for (name, secret, scope) in seeds {
            let hash = passwords.hash((*secret).to_string()).await?;
            sqlx::query(insert)
                .bind(*name)
                .bind(hash)
                .bind(*scope)
                .bind(now_ms())
                .execute(db.pool())
                .await
                .map_err(db_error)?;
        }
        tracing::info!(table, "development accounts created");
    }
    Ok(())
}

/// A token request, checked for shape.
enum Grant {
    Password { username: String, password: String },
    ClientCredentials { id: String, secret: String },
}

impl Grant {
    fn parse(headers: &HeaderMap, body: &[u8]) -> Result<Self, ApiError> {
        // JSON only, and said so: a browser cannot send `application/json` to another
        // site without a CORS preflight, so a page elsewhere cannot post logins here.
        let json = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the request as application/json",
            ));
        }
        let map: Map<String, Value> = serde_json::from_slice(body)
            .map_err(|_| validation("the body must be a JSON object"))?;
        let grant_type = match map.get("grant_type") {
            None => return Err(validation("grant_type is required")),
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return Err(validation("grant_type must be a string")),
        };
        match grant_type {
            "password" => Ok(Self::Password {
                username: field(&map, "username", MAX_NAME_BYTES)?,
                password: field(&map, "password", MAX_SECRET_BYTES)?,
            }),
            "client_credentials" => Ok(Self::ClientCredentials {
                id: field(&map, "client_id", MAX_NAME_BYTES)?,
                secret: field(&map, "client_secret", MAX_SECRET_BYTES)?,
            }),
            _ => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "grant_type must be password or client_credentials",
            )),
        }
    }
}

/// A string field of 1 to `max` bytes. The messages never repeat the value: it may be
/// a password.
fn field(map: &Map<String, Value>, name: &str, max: usize) -> Result<String, ApiError> {
    match map.get(name) {
        None => Err(validation(format!("{name} is required"))),
        Some(Value::String(s)) if s.is_empty() || s.len() > max => {
            Err(validation(format!("{name} must be 1 to {max} bytes")))
        }
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(validation(format!("{name} must be a string"))),
    }
}

fn validation(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "validation_failed", message)
}

/// Why a token request was refused.
enum Refusal {
    Api(ApiError),
    /// Too many failures; try again after this long.
    Locked(Duration),
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Self {
        Self::Api(e)
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Self::Api(e) => e.into_response(),
            Self::Locked(wait) => {
                // Whole seconds, rounded up: retrying at the second given must work.
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                let mut res = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_attempts",
                    "too many failed logins; try again later",
                )
                .into_response();
                res.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
                res
            }
        }
    }
}

/// An account as stored: its hash and scope.
struct Account {
    hash: String,
    scope: String,
}

#[derive(Serialize)]
struct AccessClaims<'a> {
    sub: &'a str,
    scope: &'a str,
    iss: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
    /// A unique id per token, for logs and audits.
    jti: String,
}

async fn token(
    State(ready): State<Arc<Ready>>,
    ctx: Ctx,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match issue(&ready, &ctx, &headers, &body).await {
        Ok(res) => res,
        Err(refusal) => refusal.into_response(),
    }
}

async fn issue(
    ready: &Ready,
    ctx: &Ctx,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, Refusal> {
    let grant = Grant::parse(headers, body)?;
    let limits = &ready.settings.login;
    let (name, secret, account_key, table) = match grant {
        Grant::Password { username, password } => {
            let key = format!("u:{username}");
            (username, password, key, Table::Users)
        }
        Grant::ClientCredentials { id, secret } => {
            let key = format!("c:{id}");
            (id, secret, key, Table::Clients)
        }
    };
    let source = source_address(headers);
    let source_key = format!("s:{source}");
    let counted = [
        Key {
            name: account_key.clone(),
            max: limits.max_failures_per_user,
        },
        Key {
            name: source_key.clone(),
            max: limits.max_failures_per_source,
        },
    ];
    // Before any database or argon2 work: a locked account or source costs nothing.
    if let Err(wait) = ready.limiter.begin(&counted, Instant::now()) {
        tracing::warn!(account = %name, %source, "login refused: too many failed attempts");
        return Err(Refusal::Locked(wait));
    }
    let checked = check_secret(ready, ctx.db(), table, &name, secret).await;
    let account = match checked {
        Ok(Some(account)) => account,
        Ok(None) => {
            tracing::info!(account = %name, %source, "login failed");
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_grant",
                "the credentials are not valid",
            )
            .into());
        }
        Err(e) => {
            // Nothing was checked: the attempt does not count.
            ready.limiter.undo(&account_key);
            ready.limiter.undo(&source_key);
            return Err(e.into());
        }
    };
    // The account's failures are forgiven; the source's are not (only this attempt is
    // taken back), or one valid account would let a client reset its own limit
    // between guesses at others.
    ready.limiter.reset(&account_key);
    ready.limiter.undo(&source_key);

    let s = &ready.settings;
    let keys = ready.keys.get(ctx.db()).await;
    let iat = u64::try_from(now_ms() / 1000).unwrap_or(0);
    let claims = AccessClaims {
        sub: &name,
        scope: &account.scope,
        iss: &s.issuer,
        aud: &s.audience,
        iat,
        exp: iat + s.token_ttl().as_secs(),
        jti: uuid::Uuid::new_v4().simple().to_string(),
    };
    let token = keys.sign(&claims)?;
    tracing::info!(account = %name, kid = keys.current_kid(), jti = %claims.jti, "token issued");
    // RFC 6749 §5.1: a token answer must not be stored by any cache.
    Ok((
        [(CACHE_CONTROL, "no-store"), (PRAGMA, "no-cache")],
        Json(json!({
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": s.token_ttl_s,
        })),
    )
        .into_response())
}

#[derive(Clone, Copy)]
enum Table {
    Users,
    Clients,
}

/// The account if `secret` is its password; `None` for a wrong one and for an
/// unknown account alike, after the same argon2 work.
async fn check_secret(
    ready: &Ready,
    db: &Db,
    table: Table,
    name: &str,
    secret: String,
) -> Result<Option<Account>, ApiError> {
    let sql = match table {
        Table::Users => "SELECT password_hash, scope FROM users WHERE username = $1",
        Table::Clients => "SELECT secret_hash, scope FROM clients WHERE client_id = $1",
    };
    let row = sqlx::query_as::<_, (String, String)>(sql)
        .bind(name)
        .fetch_optional(db.pool())
        .await
        .map_err(db_error)?;
    let account = row.map(|(hash, scope)| Account { hash, scope });
    let ok = ready
        .passwords
        .verify(secret, account.as_ref().map(|a| a.hash.clone()))
        .await?;
    Ok(account.filter(|_| ok))
}

/// The client's address: the last `X-Forwarded-For` entry, the one the gateway
/// appends (entries before it are whatever the client sent, so never trusted). The
/// SDK does not hand handlers the TCP peer, so a request without the header (not
/// through the gateway) counts as `unknown`, one source for all such callers.
fn source_address(headers: &HeaderMap) -> String {
    headers
        .get_all("x-forwarded-for")
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(|line| line.rsplit(',').next())
        .and_then(|entry| parse_ip(entry.trim()))
        .map_or_else(|| "unknown".to_string(), |ip| ip.to_string())
}

fn parse_ip(entry: &str) -> Option<IpAddr> {
    let ip = entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<SocketAddr>().map(|s| s.ip()))
        .ok()?;
    Some(ip.to_canonical())
}

async fn jwks(State(ready): State<Arc<Ready>>, ctx: Ctx) -> Response {
    let keys = ready.keys.get(ctx.db()).await;
    ([(CACHE_CONTROL, JWKS_CACHE_CONTROL)], Json(keys.jwks())).into_response()
}

async fn rotate(
    State(ready): State<Arc<Ready>>,
    ctx: Ctx,
    headers: HeaderMap,
) -> Result<Json<Value>, Response> {
    let db = ctx.db();
    let auth = headers.get(AUTHORIZATION);
    // The service checks the token itself, with its own keys: no header set by
    // anyone in front of it is trusted for this.
    let keys = ready.keys.get(db).await;
    let claims = match keys.verifier().verify_bearer(auth).await {
        // Perhaps signed by a key another replica rotated in a moment ago.
        Err(TokenError::UnknownKey) => {
            let keys = ready.keys.reload_on_miss(db).await;
            keys.verifier().verify_bearer(auth).await
        }
        other => other,
    };
    let claims = claims.map_err(|e| {
        let mut res = ApiError::from(e).into_response();
        res.headers_mut()
            .insert("www-authenticate", HeaderValue::from_static("Bearer"));
        res
    })?;
    if !claims.has_scope("admin") {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "rotating keys needs scope admin",
        )
        .into_response());
    }
    let keys = ready
        .keys
        .rotate(db)
        .await
        .map_err(IntoResponse::into_response)?;
    tracing::info!(by = %claims.sub, kid = keys.current_kid(), "signing key rotated on request");
    Ok(Json(json!({ "kid": keys.current_kid() })))
}
