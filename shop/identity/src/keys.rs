//! Signing keys: kept in the service's database, so every replica and every restart
//! signs with the same key, and rotated on request.

use crate::settings::Settings;
use base64::Engine as _;
use bytes::Bytes;
use serde::Serialize;
use shoal::{ApiError, Db};
use shoal_auth::{Algorithm, KeyRing, SigningKey, StaticJwks, Verifier, VerifierConfig};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The keys as last read from the database.
pub(crate) struct Keys {
    /// The current key and those retired but still published: what the JWKS shows.
    ring: KeyRing,
    /// The current key again (the ring does not lend its keys out), to sign with.
    signer: SigningKey,
    /// Checks tokens against exactly the keys of `ring`: how the service checks the
    /// admin tokens sent to it, with the same code as the gateway.
    verifier: Verifier,
    loaded_at: Instant,
}

impl Keys {
    /// The JWKS document: the current key first, then the retired keys whose tokens
    /// may still be valid.
    pub(crate) fn jwks(&self) -> serde_json::Value {
        self.ring.jwks()
    }

    /// The kid that signs now.
    pub(crate) fn current_kid(&self) -> &str {
        self.signer.kid()
    }

    pub(crate) fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// Sign `claims` (a JWS compact token whose header names the current kid).
    ///
    /// Signed here rather than by `KeyRing::sign` only because the ring signs its
    /// fixed `TokenClaims`, which has no `jti`; the header and encoding are the same.
    pub(crate) fn sign(&self, claims: &impl Serialize) -> Result<String, ApiError> {
        let der = self.signer.to_pkcs8_der();
        let (alg, key) = match self.signer.algorithm() {
            Algorithm::Es256 => (
                jsonwebtoken::Algorithm::ES256,
                jsonwebtoken::EncodingKey::from_ec_der(der),
            ),
            Algorithm::EdDsa => (
                jsonwebtoken::Algorithm::EdDSA,
                jsonwebtoken::EncodingKey::from_ed_der(der),
            ),
        };
        let mut header = jsonwebtoken::Header::new(alg);
        header.kid = Some(self.signer.kid().to_string());
        jsonwebtoken::encode(&header, claims, &key).map_err(|e| {
            tracing::error!(error = %e, "signing a token failed");
            ApiError::internal("signing failed")
        })
    }
}

/// The keys in memory, reread from the database every `key_reload_ms` so a rotation
/// made by another replica is picked up (and at once after a rotation made here).
pub(crate) struct KeyStore {
    keys: RwLock<Arc<Keys>>,
    /// Held while reloading: one reload at a time, the others serve the keys they have.
    reloading: tokio::sync::Mutex<()>,
    reload_every: Duration,
    /// When a token with an unknown kid last caused a reread.
    last_miss_reload: Mutex<Option<Instant>>,
    loader: Loader,
}

/// What reading the keys needs besides the database.
struct Loader {
    issuer: String,
    audience: String,
    /// How long a replaced key stays published.
    retire_after: Duration,
}

/// Least time between two reloads caused by tokens naming a kid we do not know: made-up
/// kids must not turn into a database query each.
const MISS_RELOAD_INTERVAL: Duration = Duration::from_secs(1);

type KeyRow = (String, String, i64, Option<i64>);

impl KeyStore {
    /// Read the keys, creating the first one if there is none.
    pub(crate) async fn open(db: &Db, s: &Settings) -> Result<Self, ApiError> {
        let loader = Loader {
            issuer: s.issuer.clone(),
            audience: s.audience.clone(),
            retire_after: s.retire_after(),
        };
        let keys = loader.load(db).await?;
        Ok(Self {
            keys: RwLock::new(Arc::new(keys)),
            reloading: tokio::sync::Mutex::new(()),
            reload_every: Duration::from_millis(s.key_reload_ms),
            last_miss_reload: Mutex::new(None),
            loader,
        })
    }

    /// The keys, reread first if they are older than `key_reload_ms`. A failed reread
    /// keeps the keys we have (logged): they were right a moment ago.
    pub(crate) async fn get(&self, db: &Db) -> Arc<Keys> {
        let keys = self.snapshot();
        if keys.loaded_at.elapsed() < self.reload_every {
            return keys;
        }
        let Ok(_guard) = self.reloading.try_lock() else {
            return keys;
        };
        self.reload_locked(db).await.unwrap_or(keys)
    }

    /// Reread now, unless a miss already caused a reread in the last second: a token
    /// named a kid we do not have, perhaps one another replica just rotated in.
    pub(crate) async fn reload_on_miss(&self, db: &Db) -> Arc<Keys> {
        let _guard = self.reloading.lock().await;
        let keys = self.snapshot();
        {
            let mut last = self
                .last_miss_reload
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|t| t.elapsed() < MISS_RELOAD_INTERVAL) {
                return keys;
            }
            *last = Some(Instant::now());
        }
        self.reload_locked(db).await.unwrap_or(keys)
    }

    /// Make a new key the signing key. The one it replaces (and any other still
    /// unretired) stays published until `now + token_ttl + rotation_margin`. Both
    /// changes are one transaction, so no replica ever reads a state with the old key
    /// retired and the new one missing.
    pub(crate) async fn rotate(&self, db: &Db) -> Result<Arc<Keys>, ApiError> {
        let _guard = self.reloading.lock().await;
        let key = new_key()?;
        let now = now_ms();
        let retire_at = now.saturating_add(duration_ms(self.loader.retire_after));
        let mut tx = db.pool().begin().await.map_err(db_error)?;
        sqlx::query("INSERT INTO signing_keys (kid, pkcs8_der, created_ms) VALUES ($1, $2, $3)")
            .bind(key.kid())
            .bind(encode_der(&key))
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        sqlx::query(
            "UPDATE signing_keys SET retire_after_ms = $1 \
             WHERE retire_after_ms IS NULL AND revoked = 0 AND kid <> $2",
        )
        .bind(retire_at)
        .bind(key.kid())
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        tracing::info!(kid = key.kid(), "signing key rotated");
        self.reload_locked(db).await
    }

    fn snapshot(&self) -> Arc<Keys> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    async fn reload_locked(&self, db: &Db) -> Result<Arc<Keys>, ApiError> {
        match self.loader.load(db).await {
            Ok(keys) => {
                let keys = Arc::new(keys);
                *self.keys.write().unwrap_or_else(PoisonError::into_inner) = keys.clone();
                Ok(keys)
            }
            Err(e) => {
                tracing::warn!(error = %e, "rereading the signing keys failed; keeping the old ones");
                Err(e)
            }
        }
    }
}

impl Loader {
    async fn load(&self, db: &Db) -> Result<Keys, ApiError> {
        let rows = read_rows(db).await?;
        let rows = if rows.iter().any(|r| r.3.is_none()) {
            rows
        } else {
            // First start (or every key revoked): make one. Conditional, so replicas
            // starting together on an empty table do not each add a current key —
            // and if they still do (two transactions on PostgreSQL), `build` takes
            // the newest and keeps the other published for a token lifetime.
            let key = new_key()?;
            sqlx::query(
                "INSERT INTO signing_keys (kid, pkcs8_der, created_ms) SELECT $1, $2, $3 \
                 WHERE NOT EXISTS \
                 (SELECT 1 FROM signing_keys WHERE revoked = 0 AND retire_after_ms IS NULL)",
            )
            .bind(key.kid())
            .bind(encode_der(&key))
            .bind(now_ms())
            .execute(db.pool())
            .await
            .map_err(db_error)?;
            read_rows(db).await?
        };
        let (ring, signer) = build(&rows, duration_ms(self.retire_after))?;
        let doc = serde_json::to_vec(&ring.jwks()).map_err(|_| ApiError::internal("jwks"))?;
        let verifier = Verifier::new(
            VerifierConfig::new(self.issuer.clone(), self.audience.clone()),
            Arc::new(StaticJwks(Bytes::from(doc))),
        );
        Ok(Keys {
            ring,
            signer,
            verifier,
            loaded_at: Instant::now(),
        })
    }
}

async fn read_rows(db: &Db) -> Result<Vec<KeyRow>, ApiError> {
    sqlx::query_as::<_, KeyRow>(
        "SELECT kid, pkcs8_der, created_ms, retire_after_ms FROM signing_keys \
         WHERE revoked = 0 AND (retire_after_ms IS NULL OR retire_after_ms > $1) \
         ORDER BY created_ms, kid",
    )
    .bind(now_ms())
    .fetch_all(db.pool())
    .await
    .map_err(db_error)
}

/// The ring of the unrevoked, unexpired keys (`rows` oldest first). The newest key
/// without a retirement time signs; an older one without one (two replicas made a
/// key at once) retires a token lifetime after the newest was made, by when nothing
/// it signed is still valid.
fn build(rows: &[KeyRow], retire_ms: i64) -> Result<(KeyRing, SigningKey), ApiError> {
    let Some(current) = rows.iter().rposition(|r| r.3.is_none()) else {
        return Err(ApiError::unavailable("no signing key; try again"));
    };
    let (kid, der, created, _) = &rows[current];
    let now = now_ms();
    let mut retiring: Vec<(&KeyRow, i64)> = rows
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != current)
        .map(|(_, r)| (r, r.3.unwrap_or(created.saturating_add(retire_ms))))
        .filter(|(_, at)| *at > now)
        .collect();
    // A verifier accepts at most 64 keys; the oldest would retire first anyway.
    let excess = retiring.len().saturating_sub(63);
    retiring.drain(..excess);

    let mut ring: Option<KeyRing> = None;
    let mut prev_retire = now;
    for (row, at) in retiring {
        let key = decode_key(&row.0, &row.1)?;
        match ring.as_mut() {
            None => ring = Some(KeyRing::new(key)),
            Some(ring) => ring.rotate(key, to_time(prev_retire)).map_err(key_error)?,
        }
        prev_retire = at;
    }
    let signing = decode_key(kid, der)?;
    let ring = match ring {
        None => KeyRing::new(signing),
        Some(mut ring) => {
            ring.rotate(signing, to_time(prev_retire))
                .map_err(key_error)?;
            ring
        }
    };
    Ok((ring, decode_key(kid, der)?))
}

fn new_key() -> Result<SigningKey, ApiError> {
    // UUIDv7: unique without coordination, and sorts by creation time.
    let kid = uuid::Uuid::now_v7().simple().to_string();
    SigningKey::generate_es256(kid).map_err(key_error)
}

/// The private key as stored: base64 PKCS#8 DER in a TEXT column (portable across
/// SQLite and PostgreSQL). It is a secret: the database must be guarded like one.
fn encode_der(key: &SigningKey) -> String {
    base64::engine::general_purpose::STANDARD.encode(key.to_pkcs8_der())
}

fn decode_key(kid: &str, b64: &str) -> Result<SigningKey, ApiError> {
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| ApiError::internal("a stored signing key is not base64"))?;
    SigningKey::from_pkcs8_der(kid, &der).map_err(key_error)
}

fn key_error(e: shoal::Error) -> ApiError {
    tracing::error!(error = %e, "signing key error");
    ApiError::internal("signing key error")
}

pub(crate) fn db_error(e: sqlx::Error) -> ApiError {
    tracing::error!(error = %e, "identity query failed");
    ApiError::internal("database error")
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn to_time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}
