use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use http::HeaderValue;
use shoal_core::{Error, ErrorKind, Origin};
use tokio::time::Instant;

use crate::jwks::{parse_jwks, KeySet};
use crate::{b64url_decode, claims, token, unix_now_s};
use crate::{Claims, JwksSource, TokenError, VerifierConfig, MAX_TOKEN_BYTES};

/// Longest a JWKS fetch may take before it counts as failed. A fetch holds up every
/// request that waits for keys, so a hung identity service must not hold them forever.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks access tokens against a JWKS it fetches, caches and refetches.
///
/// Cheap to clone: clones share the key cache and its fetches.
///
/// Keys are fetched on first use, again in the background once older than
/// `jwks_max_age_ms` (the stale keys serve meanwhile), and again when a token names an
/// unknown `kid`, at most once per `jwks_refresh_min_interval_ms`; concurrent requests
/// that need a fetch share one. After a failed fetch the cached keys stay in use, and
/// no fetch is tried for `jwks_refresh_min_interval_ms`.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: VerifierConfig,
    source: Arc<dyn JwksSource>,
    cache: Mutex<Cache>,
    /// Tokens whose signature held, by their whole text: a client sends the same
    /// token on every request, and checking a signature costs tens of microseconds.
    verified: Mutex<std::collections::HashMap<String, Verified>>,
    /// Held for the length of a fetch: whoever holds it is the single flight.
    fetch_lock: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Default)]
struct Cache {
    /// The last JWKS fetched successfully; `None` until one was.
    keys: Option<Arc<KeySet>>,
    /// Counts finished fetches (successful or not). A waiter that sees it moved knows
    /// someone fetched while it waited and does not fetch again.
    generation: u64,
    fetched_at: Option<Instant>,
    /// When a fetch caused by an unknown `kid` last started.
    last_kid_fetch: Option<Instant>,
    /// When the last fetch failed, if the last fetch did.
    last_failure: Option<Instant>,
}

/// A token that verified, and against which keys.
struct Verified {
    claims: Claims,
    keys: Arc<KeySet>,
    at: Instant,
}

/// Most verified tokens remembered; past it the memory starts over.
const MAX_VERIFIED: usize = 10_000;
/// Longest a verified token is remembered (its `exp` is checked on every use too).
const VERIFIED_FOR: Duration = Duration::from_secs(30);

/// Why a fetch is wanted; each reason has its own limit.
#[derive(Clone, Copy)]
enum Reason {
    /// Nothing cached yet.
    Load,
    /// The cache is older than `jwks_max_age_ms`.
    Stale,
    /// A token names a `kid` the cache does not have.
    UnknownKid,
}

impl Verifier {
    /// A verifier that fetches keys from `source` when it first needs them.
    ///
    /// The config is used as given; check it with [`VerifierConfig::validate`] where it
    /// is loaded.
    pub fn new(cfg: VerifierConfig, source: Arc<dyn JwksSource>) -> Self {
        Self {
            inner: Arc::new(Inner {
                cfg,
                source,
                cache: Mutex::new(Cache::default()),
                verified: Mutex::new(std::collections::HashMap::new()),
                fetch_lock: Arc::new(tokio::sync::Mutex::new(())),
            }),
        }
    }

    /// Verify a JWS compact token and return its claims.
    ///
    /// In order: size and shape, header `alg` (ES256 or EdDSA), `kid` (none is
    /// [`TokenError::UnknownKey`]), the key's own algorithm against the header's, the
    /// signature, then the claims. Claims are read only once the signature holds.
    ///
    /// A token that verified is remembered (by its whole text, at most 30 s): it is
    /// answered again without the signature check while the keys it verified
    /// against are still the current ones (a JWKS refresh, and so a revocation,
    /// forgets it) and its `exp` has not passed.
    pub async fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed);
        }
        let parts = token::split(token)?;
        let kid = parts.kid.as_deref().ok_or(TokenError::UnknownKey)?;
        let keys = self.keys_for(kid).await?;
        let now = Instant::now();
        let remembered = {
            let seen = lock(&self.inner.verified);
            seen.get(token).and_then(|v| {
                let fresh = Arc::ptr_eq(&v.keys, &keys)
                    && now.saturating_duration_since(v.at) < VERIFIED_FOR
                    && unix_now_s() <= v.claims.exp.saturating_add(self.inner.cfg.leeway_s);
                fresh.then(|| v.claims.clone())
            })
        };
        if let Some(c) = remembered {
            return Ok(c);
        }
        let claims = self.check(&parts, kid, &keys)?;
        let mut seen = lock(&self.inner.verified);
        if seen.len() >= MAX_VERIFIED {
            seen.clear();
        }
        seen.insert(
            token.to_string(),
            Verified {
                claims: claims.clone(),
                keys,
                at: now,
            },
        );
        Ok(claims)
    }

    /// The signature and claims of `parts` against `keys`.
    fn check(
        &self,
        parts: &token::Parts<'_>,
        kid: &str,
        keys: &Arc<KeySet>,
    ) -> Result<Claims, TokenError> {
        let key = keys.get(kid).ok_or(TokenError::UnknownKey)?;
        // The algorithm is the key's, not the token's: a token cannot ask for its
        // signature to be read another way (HS256 with the public key as secret, say).
        if key.alg != parts.alg {
            return Err(TokenError::UnsupportedAlgorithm);
        }
        if b64url_decode(parts.signature).is_none() {
            return Err(TokenError::Malformed);
        }
        let valid = jsonwebtoken::crypto::verify(
            parts.signature,
            parts.signing_input.as_bytes(),
            &key.key,
            key.alg.jwt(),
        );
        if !matches!(valid, Ok(true)) {
            return Err(TokenError::BadSignature);
        }
        let payload = b64url_decode(parts.payload).ok_or(TokenError::Malformed)?;
        claims::validate(&payload, &self.inner.cfg, unix_now_s())
    }

    /// Verify the token of an `Authorization: Bearer <token>` header (the scheme is
    /// case-insensitive). No header is [`TokenError::Missing`]; another scheme, or no
    /// token after it, is [`TokenError::Malformed`].
    pub async fn verify_bearer(
        &self,
        authorization: Option<&HeaderValue>,
    ) -> Result<Claims, TokenError> {
        let value = authorization.ok_or(TokenError::Missing)?;
        self.verify(bearer_token(value.as_bytes())?).await
    }

    /// The cached keys, fetched or refreshed first when needed.
    async fn keys_for(&self, kid: &str) -> Result<Arc<KeySet>, TokenError> {
        let (keys, generation, stale) = {
            let c = self.inner.cache();
            let stale = c.is_stale(Instant::now(), self.inner.max_age());
            (c.keys.clone(), c.generation, stale)
        };
        let (keys, generation) = match keys {
            None => self.refresh(generation, Reason::Load).await,
            Some(keys) => {
                if stale {
                    self.refresh_in_background(generation);
                }
                (Some(keys), generation)
            }
        };
        let keys = keys.ok_or(TokenError::KeysUnavailable)?;
        if keys.get(kid).is_some() {
            return Ok(keys);
        }
        let (fresh, _) = self.refresh(generation, Reason::UnknownKid).await;
        Ok(fresh.unwrap_or(keys))
    }

    /// Fetch (or wait for the fetch in flight) unless the limits say no; returns the
    /// keys cached afterwards. `seen` is the generation the caller last looked at.
    async fn refresh(&self, seen: u64, reason: Reason) -> (Option<Arc<KeySet>>, u64) {
        let guard = self.inner.fetch_lock.clone().lock_owned().await;
        if self.inner.claim_fetch(seen, reason) {
            // Run the fetch as its own task, holding the lock: if this caller is
            // dropped, the fetch still finishes and the waiters behind it get its keys.
            let inner = self.inner.clone();
            let task = tokio::spawn(async move {
                let _guard = guard;
                inner.fetch_and_store().await;
            });
            // An error here means the fetch panicked; the cache is as it was.
            let _ = task.await;
        }
        let c = self.inner.cache();
        (c.keys.clone(), c.generation)
    }

    /// Start a refresh of stale keys without waiting for it, unless one is in flight.
    fn refresh_in_background(&self, seen: u64) {
        let Ok(guard) = self.inner.fetch_lock.clone().try_lock_owned() else {
            return;
        };
        if self.inner.claim_fetch(seen, Reason::Stale) {
            let inner = self.inner.clone();
            tokio::spawn(async move {
                let _guard = guard;
                inner.fetch_and_store().await;
            });
        }
    }
}

impl Inner {
    fn cache(&self) -> MutexGuard<'_, Cache> {
        // Every update of the cache is a few plain assignments; a panic elsewhere
        // cannot leave it half-written, so a poisoned lock is still good.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn max_age(&self) -> Duration {
        Duration::from_millis(self.cfg.jwks_max_age_ms)
    }

    /// Whether a fetch for `reason` may start now; called with the fetch lock held.
    /// Records the start of an unknown-`kid` fetch, so even a cancelled one counts.
    fn claim_fetch(&self, seen: u64, reason: Reason) -> bool {
        let now = Instant::now();
        let min = Duration::from_millis(self.cfg.jwks_refresh_min_interval_ms);
        let recent = |t: Option<Instant>| t.is_some_and(|t| now.duration_since(t) < min);
        let mut c = self.cache();
        if c.generation != seen || recent(c.last_failure) {
            return false;
        }
        match reason {
            Reason::Load => c.keys.is_none(),
            Reason::Stale => c.is_stale(now, self.max_age()),
            Reason::UnknownKid => {
                if recent(c.last_kid_fetch) {
                    return false;
                }
                c.last_kid_fetch = Some(now);
                true
            }
        }
    }

    async fn fetch_and_store(&self) {
        let result = match tokio::time::timeout(FETCH_TIMEOUT, self.source.fetch()).await {
            Ok(Ok(doc)) => parse_jwks(&doc),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                Origin::Upstream,
                "JWKS fetch timed out",
            )),
        };
        let now = Instant::now();
        let mut c = self.cache();
        c.generation += 1;
        match result {
            Ok(keys) => {
                tracing::debug!(keys = keys.len(), "JWKS fetched");
                c.keys = Some(Arc::new(keys));
                c.fetched_at = Some(now);
                c.last_failure = None;
            }
            Err(error) => {
                tracing::warn!(%error, cached = c.keys.is_some(), "JWKS fetch failed");
                c.last_failure = Some(now);
            }
        }
    }
}

impl Cache {
    fn is_stale(&self, now: Instant, max_age: Duration) -> bool {
        self.fetched_at
            .is_some_and(|t| now.duration_since(t) >= max_age)
    }
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("cfg", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

/// The token of an `Authorization` value `Bearer <token>` (RFC 6750 §2.1).
fn bearer_token(value: &[u8]) -> Result<&str, TokenError> {
    // "Bearer " plus the longest token, with room for stray spaces.
    if value.len() > MAX_TOKEN_BYTES + 64 {
        return Err(TokenError::Malformed);
    }
    let value = std::str::from_utf8(value).map_err(|_| TokenError::Malformed)?;
    let (scheme, rest) = value.split_once([' ', '\t']).ok_or(TokenError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(TokenError::Malformed);
    }
    let token = rest.trim_matches([' ', '\t']);
    if token.is_empty() || token.contains([' ', '\t']) {
        return Err(TokenError::Malformed);
    }
    Ok(token)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
