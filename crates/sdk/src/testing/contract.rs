//! Consumer contracts: what one service expects of another's API and events, written
//! down by the consumer and verified in the provider's own tests, so each service can
//! be tested and released without starting its neighbours.
//!
//! A contract is a JSON file:
//!
//! ```json
//! {
//!   "consumer": "orders",
//!   "provider": "inventory",
//!   "interactions": [{
//!     "description": "reserve stock for an order",
//!     "given": "stock of p-1 is 100",
//!     "request": {"method": "POST", "path": "/internal/reservations",
//!                 "headers": {"idempotency-key": "k-1"},
//!                 "body": {"reservation_id": "o-1", "items": [{"product_id": "p-1", "quantity": 2}]}},
//!     "response": {"status": 200, "body": {"reservation_id": "o-1", "status": "reserved"},
//!                  "exact": ["/status"]}
//!   }],
//!   "messages": [{
//!     "description": "an approved order", "topic": "orders.events",
//!     "headers": {"type": "order.approved"}, "body": {"order_id": "o-1", "total_cents": 100}
//!   }]
//! }
//! ```
//!
//! Answers are matched **by shape**, the way a tolerant consumer reads them: every
//! field of the example must be there with the same JSON type (integers stay
//! integers), arrays must hold elements shaped like the example's first, and fields
//! the example lacks are allowed (a provider may add fields). Values are compared
//! only where `exact` names them (JSON pointers) and for `headers`. Interactions
//! run in file order, each after its `given` state is set up by the provider's test.

use super::{request, Answer};
use http::Method;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;

/// One consumer's expectations of one provider.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contract {
    /// The service that relies on the provider.
    pub consumer: String,
    /// The service that must keep the promise.
    pub provider: String,
    /// Requests and the answers the consumer relies on.
    #[serde(default)]
    pub interactions: Vec<Interaction>,
    /// Events the consumer reads from the provider.
    #[serde(default)]
    pub messages: Vec<MessageExample>,
}

/// One request and the answer relied on.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interaction {
    /// What the consumer does, for messages.
    pub description: String,
    /// The provider state needed first, set up by the provider's test.
    #[serde(default)]
    pub given: Option<String>,
    /// The request.
    pub request: ContractRequest,
    /// The answer.
    pub response: ContractResponse,
}

/// A request of an interaction.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContractRequest {
    /// `GET`, `POST`, …
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Headers sent.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// A JSON body, sent with `content-type: application/json`.
    #[serde(default)]
    pub body: Option<Value>,
}

/// The answer an interaction relies on.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContractResponse {
    /// The status.
    pub status: u16,
    /// Headers whose values must be equal.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// An example body, matched by shape.
    #[serde(default)]
    pub body: Option<Value>,
    /// JSON pointers into the body whose values must equal the example's.
    #[serde(default)]
    pub exact: Vec<String>,
}

/// An event the consumer reads.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageExample {
    /// Which event, for messages and lookups.
    pub description: String,
    /// The topic it comes on.
    pub topic: String,
    /// Headers whose values must be equal (the event's `type`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// An example body, matched by shape.
    pub body: Value,
    /// JSON pointers into the body whose values must equal the example's.
    #[serde(default)]
    pub exact: Vec<String>,
}

impl Contract {
    /// Read a contract file.
    ///
    /// # Panics
    /// If the file is missing or not a contract (a test failure naming the file).
    pub fn load(path: impl AsRef<Path>) -> Self {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("contract {}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("contract {}: {e}", path.display()))
    }

    /// Run every interaction against the provider at `addr`, calling `given` before
    /// those that name a state. Answers every broken promise at once.
    pub async fn verify<F, Fut>(&self, addr: SocketAddr, mut given: F) -> Result<(), String>
    where
        F: FnMut(String) -> Fut,
        Fut: Future<Output = ()>,
    {
        let mut broken = Vec::new();
        for i in &self.interactions {
            if let Some(state) = &i.given {
                given(state.clone()).await;
            }
            if let Err(e) = self.run(addr, i).await {
                broken.push(format!("\"{}\": {e}", i.description));
            }
        }
        if self.interactions.is_empty() {
            broken.push("the contract has no interactions".into());
        }
        match broken.is_empty() {
            true => Ok(()),
            false => Err(format!(
                "{} breaks its contract with {}:\n  {}",
                self.provider,
                self.consumer,
                broken.join("\n  ")
            )),
        }
    }

    async fn run(&self, addr: SocketAddr, i: &Interaction) -> Result<(), String> {
        let method = Method::from_bytes(i.request.method.as_bytes()).map_err(|e| e.to_string())?;
        let mut headers: Vec<(&str, &str)> = i
            .request
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let body = match &i.request.body {
            Some(b) => {
                headers.push(("content-type", "application/json"));
                serde_json::to_vec(b).map_err(|e| e.to_string())?
            }
            None => Vec::new(),
        };
        let answer = request(addr, method, &i.request.path, &headers, body).await?;
        check_answer(&i.response, &answer)
    }

    /// The message example called `description`.
    ///
    /// # Panics
    /// If there is none (a test failure).
    pub fn message(&self, description: &str) -> &MessageExample {
        self.messages
            .iter()
            .find(|m| m.description == description)
            .unwrap_or_else(|| panic!("no message \"{description}\" in the contract"))
    }
}

impl MessageExample {
    /// Check an event the provider really produced against this example.
    pub fn check(
        &self,
        topic: &str,
        headers: &BTreeMap<String, String>,
        body: &Value,
    ) -> Result<(), String> {
        if topic != self.topic {
            return Err(format!("topic {topic}, expected {}", self.topic));
        }
        for (k, v) in &self.headers {
            if headers.get(k) != Some(v) {
                return Err(format!("header {k}: {:?}, expected {v:?}", headers.get(k)));
            }
        }
        matches_shape(&self.body, body, "")?;
        exact(&self.exact, &self.body, body)
    }
}

fn check_answer(expected: &ContractResponse, answer: &Answer) -> Result<(), String> {
    if answer.status.as_u16() != expected.status {
        return Err(format!(
            "status {}, expected {}: {}",
            answer.status,
            expected.status,
            answer.text()
        ));
    }
    for (k, v) in &expected.headers {
        let got = answer.headers.get(k.as_str()).and_then(|h| h.to_str().ok());
        if got != Some(v.as_str()) {
            return Err(format!("header {k}: {got:?}, expected {v:?}"));
        }
    }
    if let Some(example) = &expected.body {
        let actual: Value = serde_json::from_slice(&answer.body)
            .map_err(|e| format!("body is not JSON ({e}): {}", answer.text()))?;
        matches_shape(example, &actual, "")?;
        exact(&expected.exact, example, &actual)?;
    }
    Ok(())
}

fn exact(pointers: &[String], example: &Value, actual: &Value) -> Result<(), String> {
    for p in pointers {
        let want = example
            .pointer(p)
            .ok_or_else(|| format!("exact {p}: not in the example"))?;
        if actual.pointer(p) != Some(want) {
            return Err(format!("{p}: {:?}, expected {want}", actual.pointer(p)));
        }
    }
    Ok(())
}

/// Whether `actual` has the shape of `example` (see the module's doc); the error
/// names the first field that differs by its JSON pointer.
pub fn matches_shape(example: &Value, actual: &Value, at: &str) -> Result<(), String> {
    let kind = |v: &Value| match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    let here = if at.is_empty() { "/" } else { at };
    match (example, actual) {
        (Value::Object(want), Value::Object(got)) => {
            for (k, v) in want {
                let at = format!("{at}/{k}");
                match got.get(k) {
                    Some(g) => matches_shape(v, g, &at)?,
                    None => return Err(format!("{at}: missing")),
                }
            }
            Ok(())
        }
        (Value::Array(want), Value::Array(got)) => match want.first() {
            None => Ok(()),
            Some(_) if got.is_empty() => Err(format!("{here}: empty, expected elements")),
            Some(first) => got
                .iter()
                .enumerate()
                .try_for_each(|(i, g)| matches_shape(first, g, &format!("{at}/{i}"))),
        },
        // A number example accepts integers too; an integer example only integers.
        (Value::Number(_), Value::Number(_)) if kind(example) == "number" => Ok(()),
        _ if kind(example) == kind(actual) => Ok(()),
        _ => Err(format!(
            "{here}: {} ({actual}), expected {}",
            kind(actual),
            kind(example)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn shapes_match_by_type_and_tolerate_added_fields() {
        let example = json!({"id": "o-1", "n": 2, "items": [{"q": 1}], "reason": null});
        let actual = json!({"id": "x", "n": 7, "items": [{"q": 3, "extra": true}, {"q": 4}], "reason": null, "new": 1});
        assert!(matches_shape(&example, &actual, "").is_ok());

        let broken = json!({"id": "x", "n": 7.5, "items": [{"q": 3}], "reason": null});
        assert_eq!(
            matches_shape(&example, &broken, "").unwrap_err(),
            "/n: number (7.5), expected integer"
        );
        let missing = json!({"id": "x", "n": 1, "items": [{"q": 3}, {}], "reason": null});
        assert_eq!(
            matches_shape(&example, &missing, "").unwrap_err(),
            "/items/1/q: missing"
        );
        let empty = json!({"id": "x", "n": 1, "items": [], "reason": null});
        assert!(matches_shape(&example, &empty, "")
            .unwrap_err()
            .contains("/items: empty"));
        assert!(matches_shape(&json!([1]), &json!({}), "")
            .unwrap_err()
            .starts_with("/: object"));
    }

    #[test]
    fn exact_values_and_messages() {
        let c: Contract = serde_json::from_value(json!({
            "consumer": "shipping", "provider": "orders",
            "messages": [{"description": "approved", "topic": "orders.events",
                          "headers": {"type": "order.approved"},
                          "body": {"order_id": "o-1", "status": "APPROVED"}, "exact": ["/status"]}]
        }))
        .unwrap();
        let m = c.message("approved");
        let mut headers = BTreeMap::new();
        headers.insert("type".to_string(), "order.approved".to_string());
        assert!(m
            .check(
                "orders.events",
                &headers,
                &json!({"order_id": "o-9", "status": "APPROVED"})
            )
            .is_ok());
        assert!(m
            .check(
                "orders.events",
                &headers,
                &json!({"order_id": "o-9", "status": "REJECTED"})
            )
            .is_err());
        assert!(m
            .check(
                "orders.other",
                &headers,
                &json!({"order_id": "o-9", "status": "APPROVED"})
            )
            .is_err());
        assert!(m
            .check(
                "orders.events",
                &BTreeMap::new(),
                &json!({"order_id": "o-9", "status": "APPROVED"})
            )
            .is_err());
        // Unknown keys in a contract file are mistakes, not ignored.
        assert!(serde_json::from_value::<Contract>(
            json!({"consumer": "a", "provider": "b", "interaction": []})
        )
        .is_err());
    }
}
