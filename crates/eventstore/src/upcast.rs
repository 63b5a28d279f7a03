//! Versioned event types: an event is stored with the version of its type's shape,
//! and readers see it upcast, one version at a time, to the current shape. Old
//! events are never rewritten.

use shoal_core::{Error, ErrorKind, Origin};
use std::collections::HashMap;
use std::sync::Arc;

type Step = Arc<dyn Fn(serde_json::Value) -> Result<serde_json::Value, String> + Send + Sync>;

/// The upcasters of a store: `(event type, version)` → the step to `version + 1`.
#[derive(Clone, Default)]
pub struct Upcasters {
    steps: HashMap<(String, u32), Step>,
}

/// Most steps one event may go through (a loop in the registry stops here).
const MAX_STEPS: u32 = 64;

impl Upcasters {
    /// No upcasters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Turn `event_type` at `from` into its shape at `from + 1`.
    pub fn add<F>(mut self, event_type: &str, from: u32, step: F) -> Self
    where
        F: Fn(serde_json::Value) -> Result<serde_json::Value, String> + Send + Sync + 'static,
    {
        self.steps
            .insert((event_type.to_string(), from), Arc::new(step));
        self
    }

    /// `data` of `event_type` at `version`, upcast as far as steps exist.
    pub fn upcast(
        &self,
        event_type: &str,
        mut version: u32,
        mut data: serde_json::Value,
    ) -> Result<(u32, serde_json::Value), Error> {
        if self.steps.is_empty() {
            return Ok((version, data));
        }
        for _ in 0..MAX_STEPS {
            let Some(step) = self.steps.get(&(event_type.to_string(), version)) else {
                return Ok((version, data));
            };
            data = step(data).map_err(|why| {
                Error::new(
                    ErrorKind::Protocol,
                    Origin::Internal,
                    format!("upcasting {event_type} from version {version}: {why}"),
                )
            })?;
            version += 1;
        }
        Err(Error::new(
            ErrorKind::Internal,
            Origin::Internal,
            format!("upcasting {event_type}: more than {MAX_STEPS} steps"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn steps_chain_to_the_current_shape() {
        let u = Upcasters::new()
            .add("Placed", 1, |mut v| {
                v["currency"] = json!("EUR");
                Ok(v)
            })
            .add("Placed", 2, |v| {
                Ok(json!({"total": {"cents": v["cents"], "currency": v["currency"]}}))
            });
        let (ver, data) = u.upcast("Placed", 1, json!({"cents": 5})).unwrap();
        assert_eq!(ver, 3);
        assert_eq!(data, json!({"total": {"cents": 5, "currency": "EUR"}}));
        let (ver, _) = u.upcast("Placed", 3, json!({})).unwrap();
        assert_eq!(ver, 3);
        let (ver, _) = u.upcast("Other", 1, json!({})).unwrap();
        assert_eq!(ver, 1);
        let bad = Upcasters::new().add("X", 1, |_| Err("no cents".into()));
        let e = bad.upcast("X", 1, json!({})).unwrap_err();
        assert!(e.to_string().contains("no cents"));
    }
}
