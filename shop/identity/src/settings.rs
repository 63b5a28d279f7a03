//! The service's `[settings]` table, read and checked at start.

use serde::Deserialize;
use std::time::Duration;

/// The identity service's `[settings]` (every key has a default; unknown keys stop the
/// start). Environment overrides nest with `__`: `SHOAL_SETTINGS__TOKEN_TTL_S=300`,
/// `SHOAL_SETTINGS__LOGIN__MAX_FAILURES_PER_USER=3`.
///
/// ```toml
/// [settings]
/// issuer = "shoal-shop"
/// audience = "shoal-shop"
/// token_ttl_s = 900
/// rotation_margin_s = 60
/// key_reload_ms = 5000
/// seed_accounts = true
/// max_concurrent_hashes = 4
///
/// [settings.login]
/// max_failures_per_user = 5
/// max_failures_per_source = 20
/// window_s = 60
/// max_tracked_keys = 10000
///
/// [settings.password_hash]
/// memory_kib = 19456
/// iterations = 2
/// parallelism = 1
/// ```
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// `iss` of every token, and what the service itself expects when it checks one.
    pub issuer: String,
    /// `aud` of every token: the gateway is configured with the same value.
    pub audience: String,
    /// Lifetime of an access token, seconds (1 to 86400).
    pub token_ttl_s: u64,
    /// After a rotation the old key stays published until `now + token_ttl_s +
    /// rotation_margin_s`. The margin covers the verifiers' clock leeway (30 s by
    /// default) and the time other replicas take to notice the rotation
    /// (`key_reload_ms`), during which they still sign with the old key.
    pub rotation_margin_s: u64,
    /// How often a replica rereads the keys from the database, so it picks up a
    /// rotation another replica made. 0 rereads on every request (tests).
    pub key_reload_ms: u64,
    /// Create the development users and client when the tables are empty.
    pub seed_accounts: bool,
    /// Most argon2 hashes computed at once (1 to 64). Each takes tens of
    /// milliseconds of a core and `memory_kib` of memory; the rest wait, so a login
    /// flood cannot take every core or the blocking pool.
    pub max_concurrent_hashes: usize,
    /// Limits on failed logins.
    pub login: LoginLimits,
    /// argon2id cost of new password hashes (existing hashes carry their own).
    pub password_hash: HashCost,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            issuer: "shoal-shop".into(),
            audience: "shoal-shop".into(),
            token_ttl_s: 900,
            rotation_margin_s: 60,
            key_reload_ms: 5_000,
            seed_accounts: true,
            max_concurrent_hashes: 4,
            login: LoginLimits::default(),
            password_hash: HashCost::default(),
        }
    }
}

/// `[settings.login]`: failed logins allowed before further attempts are refused
/// with 429, counted per account (username or client id) and per source address.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoginLimits {
    /// Failures for one username (or client id) within `window_s`.
    pub max_failures_per_user: u32,
    /// Failures from one source address within `window_s`, whatever the username:
    /// it stops one client guessing across many accounts.
    pub max_failures_per_source: u32,
    /// The window, seconds from a key's first failure; a locked key is free again
    /// when it ends.
    pub window_s: u64,
    /// Most usernames and addresses tracked at once; past it expired entries are
    /// dropped, then the oldest. Bounds the memory a flood of names can take.
    pub max_tracked_keys: usize,
}

impl Default for LoginLimits {
    fn default() -> Self {
        Self {
            max_failures_per_user: 5,
            max_failures_per_source: 20,
            window_s: 60,
            max_tracked_keys: 10_000,
        }
    }
}

/// `[settings.password_hash]`: argon2id parameters of hashes made from now on. The
/// defaults are the argon2 crate's (OWASP's minimum for argon2id).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HashCost {
    /// Memory per hash, KiB.
    pub memory_kib: u32,
    /// Passes over the memory.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl Default for HashCost {
    fn default() -> Self {
        Self {
            memory_kib: argon2::Params::DEFAULT_M_COST,
            iterations: argon2::Params::DEFAULT_T_COST,
            parallelism: argon2::Params::DEFAULT_P_COST,
        }
    }
}

impl HashCost {
    /// The argon2 parameters, or why they are not valid.
    pub(crate) fn params(&self) -> Result<argon2::Params, String> {
        argon2::Params::new(self.memory_kib, self.iterations, self.parallelism, None)
            .map_err(|e| format!("password_hash: {e}"))
    }
}

/// [`Settings`] that passed [`Settings::check`]: the type given to
/// `Service::settings`, so a value that cannot work stops the start instead of
/// failing the first login.
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "Settings")]
pub(crate) struct Checked(pub(crate) Settings);

impl TryFrom<Settings> for Checked {
    type Error = String;

    fn try_from(s: Settings) -> Result<Self, String> {
        s.check()?;
        Ok(Self(s))
    }
}

impl Settings {
    fn check(&self) -> Result<(), String> {
        if self.issuer.is_empty() || self.audience.is_empty() {
            return Err("issuer and audience must not be empty".into());
        }
        if !(1..=86_400).contains(&self.token_ttl_s) {
            return Err(format!(
                "token_ttl_s is {}, expected 1 to 86400",
                self.token_ttl_s
            ));
        }
        if self.rotation_margin_s > 86_400 {
            return Err("rotation_margin_s is over 86400".into());
        }
        if !(1..=64).contains(&self.max_concurrent_hashes) {
            return Err("max_concurrent_hashes must be 1 to 64".into());
        }
        let l = &self.login;
        if l.max_failures_per_user == 0 || l.max_failures_per_source == 0 {
            return Err("login.max_failures_per_user and _per_source must be positive".into());
        }
        if !(1..=86_400).contains(&l.window_s) {
            return Err("login.window_s must be 1 to 86400".into());
        }
        if l.max_tracked_keys < 2 {
            return Err("login.max_tracked_keys must be at least 2".into());
        }
        self.password_hash.params()?;
        Ok(())
    }

    pub(crate) fn token_ttl(&self) -> Duration {
        Duration::from_secs(self.token_ttl_s)
    }

    /// How long a replaced key stays published.
    pub(crate) fn retire_after(&self) -> Duration {
        Duration::from_secs(self.token_ttl_s + self.rotation_margin_s)
    }
}
