//! Connecting a service to the bus its `[bus]` table names.

use crate::config::{BusBackend, ServiceConfig};
use shoal_bus::SharedBus;
use shoal_core::Error;
use std::sync::Arc;

/// The bus for `cfg`: the embedded broker (at `bus.url`, or where the control plane
/// at `registry_url` says its broker listens), or NATS JetStream at `bus.url`.
pub(crate) async fn connect(cfg: &ServiceConfig) -> Result<SharedBus, Error> {
    match cfg.bus.backend {
        BusBackend::Embedded => {
            let addr = match &cfg.bus.url {
                Some(addr) => addr.clone(),
                None => shoal_discovery::RegistryClient::new(&cfg.registry_url)?
                    .broker_addr()
                    .await
                    .map_err(|e| {
                        Error::new(
                            e.kind(),
                            e.origin(),
                            format!(
                                "bus: asking the control plane at {} where its broker is: {e}",
                                cfg.registry_url
                            ),
                        )
                    })?,
            };
            let bus = shoal_broker::EmbeddedBus::connect(addr.as_str()).await?;
            Ok(Arc::new(bus))
        }
        BusBackend::Jetstream => {
            let url = cfg
                .bus
                .url
                .as_deref()
                .ok_or_else(|| Error::config("bus.url: required for the jetstream backend"))?;
            let bus = shoal_bus_nats::JetStreamBus::connect(url, Default::default()).await?;
            Ok(Arc::new(bus))
        }
    }
}
