//! Password hashing with argon2id, off the async runtime and bounded in concurrency.

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};
use shoal::ApiError;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Hashes and checks passwords.
///
/// argon2 is slow on purpose (tens of milliseconds of a core and ~19 MiB per hash):
/// each runs on the blocking pool, never on a runtime worker, and at most
/// `max_concurrent` run at once, so a flood of logins queues here instead of
/// starving the runtime (and everything else this process serves).
pub(crate) struct Passwords {
    params: Params,
    permits: Arc<Semaphore>,
    /// A hash of a random password with the same parameters as real ones: an unknown
    /// account is checked against it, so its answer takes as long as a wrong password
    /// and the timing does not tell which accounts exist.
    dummy: String,
}

impl Passwords {
    pub(crate) async fn new(params: Params, max_concurrent: usize) -> Result<Self, ApiError> {
        let mut this = Self {
            params,
            permits: Arc::new(Semaphore::new(max_concurrent)),
            dummy: String::new(),
        };
        this.dummy = this.hash(uuid::Uuid::new_v4().to_string()).await?;
        Ok(this)
    }

    /// A PHC string (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`) with a fresh random salt.
    pub(crate) async fn hash(&self, password: String) -> Result<String, ApiError> {
        let params = self.params.clone();
        self.blocking(move || {
            Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
                .hash_password(password.as_bytes())
                .map(|h| h.to_string())
                .map_err(|e| {
                    tracing::error!(error = %e, "hashing a password failed");
                    ApiError::internal("hashing failed")
                })
        })
        .await?
    }

    /// Whether `password` matches `stored` (a PHC string). `None` (no such account)
    /// is checked against the dummy hash and is always false.
    pub(crate) async fn verify(
        &self,
        password: String,
        stored: Option<String>,
    ) -> Result<bool, ApiError> {
        let known = stored.is_some();
        let phc = stored.unwrap_or_else(|| self.dummy.clone());
        let matches = self
            .blocking(move || {
                // The parameters come from the stored hash itself, so hashes made
                // under older settings keep verifying.
                Argon2::default()
                    .verify_password(password.as_bytes(), phc.as_str())
                    .is_ok()
            })
            .await?;
        Ok(known && matches)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::unavailable("shutting down"))?;
        // The permit goes with the work: a request that is dropped (client gone,
        // timeout) does not free it while its hash is still being computed.
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work()
        })
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "password hashing task failed");
            ApiError::internal("hashing failed")
        })
    }
}
