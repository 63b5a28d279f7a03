use crate::{Db, ServiceConfig};
use axum::extract::FromRequestParts;
use http::request::Parts;
use shoal_core::ApiError;
use shoal_discovery::{Caller, Discovery, ServiceClient};
use shoal_eventstore::EventStore;
use shoal_telemetry::Metrics;
use std::sync::Arc;

/// What a handler needs from the platform: its database, clients of other services,
/// metrics and identity. Extract it in any handler: `async fn h(ctx: Ctx)`.
#[derive(Clone)]
pub struct Ctx(pub(crate) Arc<CtxInner>);

pub(crate) struct CtxInner {
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) instance_id: String,
    pub(crate) db: Option<Db>,
    pub(crate) events: Option<EventStore>,
    pub(crate) caller: Caller,
    pub(crate) metrics: Metrics,
    pub(crate) config: ServiceConfig,
    pub(crate) bus: Option<shoal_bus::SharedBus>,
    pub(crate) outbox: Option<crate::messaging::Outbox>,
    pub(crate) settings: Option<Arc<dyn std::any::Any + Send + Sync>>,
    /// Turns true when the service starts shutting down.
    pub(crate) stopping: tokio::sync::watch::Receiver<bool>,
    /// Tasks started with [`Ctx::spawn`], awaited at shutdown.
    pub(crate) tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Records this instance's spans.
    pub(crate) tracer: shoal_telemetry::Tracer,
}

impl Ctx {
    /// The service's own settings, read at start from `[settings]` into the type
    /// given to [`crate::Service::settings`].
    ///
    /// # Panics
    /// If `T` is not that type, or the service named none: a programming error,
    /// found by the first test that reaches the call.
    pub fn settings<T: Send + Sync + 'static>(&self) -> Arc<T> {
        match self.0.settings.clone().map(|s| s.downcast::<T>()) {
            Some(Ok(settings)) => settings,
            _ => panic!(
                "service {} has no settings of type {}: call Service::settings",
                self.0.name,
                std::any::type_name::<T>()
            ),
        }
    }

    /// Resolves when the service starts shutting down (after it stopped serving):
    /// background work started with [`Ctx::spawn`] ends when it does.
    pub fn stopping(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.0.stopping.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    /// Run `task` in the background for as long as the service runs. It must end
    /// once [`Ctx::stopping`] resolves: the service's shutdown waits for it (and a
    /// dropped service aborts it).
    pub fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let handle = tokio::spawn(task);
        self.0
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handle);
    }

    pub(crate) fn take_tasks(&self) -> Vec<tokio::task::JoinHandle<()>> {
        std::mem::take(&mut *self.0.tasks.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The service's database.
    ///
    /// # Panics
    /// If the service was built without [`crate::Service::database`]: a programming
    /// error, found by the first request of any test.
    pub fn db(&self) -> &Db {
        match &self.0.db {
            Some(db) => db,
            None => panic!(
                "service {} has no database: call Service::database",
                self.0.name
            ),
        }
    }

    /// The service's event store.
    ///
    /// # Panics
    /// If the service was built without [`crate::Service::event_store`]: a
    /// programming error, found by the first request of any test.
    pub fn events(&self) -> &EventStore {
        match &self.0.events {
            Some(store) => store,
            None => panic!(
                "service {} has no event store: call Service::event_store",
                self.0.name
            ),
        }
    }

    /// The message bus, to publish directly (see [`Ctx::outbox`] to publish with a
    /// database change).
    ///
    /// # Panics
    /// If the service uses no bus (no topic, consumer, outbox or
    /// [`crate::Service::bus`]): a programming error.
    pub fn bus(&self) -> &shoal_bus::SharedBus {
        match &self.0.bus {
            Some(bus) => bus,
            None => panic!(
                "service {} has no bus: declare a topic, a consumer or the outbox",
                self.0.name
            ),
        }
    }

    /// The transactional outbox.
    ///
    /// # Panics
    /// If the service was built without [`crate::Service::outbox`].
    pub fn outbox(&self) -> &crate::messaging::Outbox {
        match &self.0.outbox {
            Some(outbox) => outbox,
            None => panic!(
                "service {} has no outbox: call Service::outbox",
                self.0.name
            ),
        }
    }

    /// A client of another service, by name.
    pub fn client(&self, service: &str) -> ServiceClient {
        ServiceClient::new(self.0.caller.clone(), service)
    }

    /// This instance's certificate store in mutual TLS mode (`[tls] mode =
    /// "mutual"`, docs/mtls.md), `None` in mode off: for a service's own clients
    /// that must present its identity (the two-phase commit links, for one). The
    /// store is renewed in place, so keep the `Arc`, not a copy of its material.
    pub fn tls(&self) -> Option<&Arc<shoal_tls::CertStore>> {
        self.0.caller.tls_store()
    }

    /// The discovery cache (instances of other services).
    pub fn discovery(&self) -> &Discovery {
        self.0.caller.balancer().discovery()
    }

    /// This process's metrics registry, to add a service's own metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// Records this instance's spans (a disabled tracer when tracing is off): for
    /// a service's own spans around work the platform does not see.
    pub fn tracer(&self) -> &shoal_telemetry::Tracer {
        &self.0.tracer
    }

    /// Service name.
    pub fn service(&self) -> &str {
        &self.0.name
    }

    /// Version this instance runs.
    pub fn version(&self) -> &str {
        &self.0.version
    }

    /// This instance's id in the registry.
    pub fn instance_id(&self) -> &str {
        &self.0.instance_id
    }

    /// The configuration in force.
    pub fn config(&self) -> &ServiceConfig {
        &self.0.config
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Ctx {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Ctx>()
            .cloned()
            .ok_or_else(|| ApiError::internal("service context missing"))
    }
}
