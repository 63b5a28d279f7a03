use crate::discovery::{AbortOnDrop, WATCH_WAIT};
use crate::RegistryClient;
use shoal_core::resilience::FaultList;
use shoal_resilience::fault::FaultInjector;

/// Keeps a process's [`FaultInjector`] in step with the control plane's fault
/// table (`shoal chaos`), so faults switch on and off without a restart. Stops
/// when dropped.
pub struct FaultWatch {
    _task: AbortOnDrop,
}

impl FaultWatch {
    /// Watch the rules of `injector`'s service.
    pub fn start(client: RegistryClient, injector: FaultInjector) -> Self {
        let service = injector.service().to_string();
        let task = crate::watch::spawn(
            "fault rules",
            client.base().to_string(),
            move |index| {
                let client = client.clone();
                let service = service.clone();
                async move { client.faults(Some(&service), index, WATCH_WAIT).await }
            },
            move |list: FaultList| {
                injector.set(list.faults);
                list.index
            },
        );
        Self {
            _task: AbortOnDrop(task),
        }
    }
}
