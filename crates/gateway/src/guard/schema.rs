//! JSON Schema validation of request bodies, so services receive only input of the
//! shape they declared.
//!
//! Schemas are compiled once, at start, with the draft their `$schema` names (2020-12
//! when none; drafts 4, 6, 7 and 2019-09 too). Nothing is fetched: the `jsonschema`
//! crate is built without HTTP or file resolving, so a `$ref` must point inside the
//! document, and one that does not is a config error at start, not a request-time
//! surprise.
//!
//! Refusals name the offending field as a JSON pointer but never quote the client's
//! values: a body that breaks the schema may well carry a card number with spaces or
//! a password in the wrong field, and refusal messages end up in logs.

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde_json::Value;
use shoal_core::{ApiError, Error};
use std::sync::Arc;

/// Most schema violations described in one answer; a body can break a schema in
/// thousands of places.
const MAX_REPORTED: usize = 3;
/// Longest description of one violation, in bytes (field names come from the client).
const MAX_ERROR_LEN: usize = 200;

/// A compiled JSON Schema for a route's request bodies; clones share it.
#[derive(Clone)]
pub(crate) struct BodySchema {
    validator: Arc<jsonschema::Validator>,
}

impl std::fmt::Debug for BodySchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodySchema")
            .field("draft", &self.validator.draft())
            .finish()
    }
}

impl BodySchema {
    /// Compile `schema`; a schema that is not valid (against its draft's meta-schema)
    /// or whose `$ref`s do not resolve is a config error naming the config key `at`.
    pub(crate) fn compile(schema: &Value, at: &str) -> Result<Self, Error> {
        let validator = jsonschema::validator_for(schema).map_err(|e| {
            Error::config(format!(
                "{at}: not a usable JSON Schema: {}",
                describe(&e, e.to_string())
            ))
        })?;
        Ok(Self {
            validator: Arc::new(validator),
        })
    }

    /// Parse `body` and check it against the schema, giving back the parsed value.
    /// Refusals are 400: `malformed_json` (with the line and column; serde_json's
    /// nesting limit of 128 makes deep bodies land here, not on the stack) or
    /// `validation_failed` (the first few violations, each as `pointer: what`).
    #[allow(
        clippy::result_large_err,
        reason = "the refusal is the complete answer, handed to axum as is; it is built \
                  once per refused request, never moved around"
    )]
    pub(crate) fn validate(&self, body: &[u8]) -> Result<Value, Response> {
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                format!("the body is not valid JSON: {e}"),
            )
            .into_response()
        })?;
        match self.violations(&value) {
            None => Ok(value),
            Some(message) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "validation_failed",
                format!("the body does not match the route's schema: {message}"),
            )
            .into_response()),
        }
    }

    fn violations(&self, value: &Value) -> Option<String> {
        let mut errors = self.validator.iter_errors(value);
        let first = errors.next()?;
        let mut parts = vec![describe(&first, first.masked().to_string())];
        for e in errors.by_ref().take(MAX_REPORTED - 1) {
            parts.push(describe(&e, e.masked().to_string()));
        }
        if errors.next().is_some() {
            parts.push("…".into());
        }
        Some(parts.join("; "))
    }
}

/// `pointer: what`, bounded; the root is written `(root)`, since its pointer is empty.
fn describe(e: &jsonschema::ValidationError<'_>, what: String) -> String {
    let pointer = e.instance_path().as_str();
    let pointer = if pointer.is_empty() {
        "(root)"
    } else {
        pointer
    };
    let line = format!("{pointer}: {what}");
    super::truncate(&line, MAX_ERROR_LEN).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use shoal_core::ApiError;

    /// The shop's order body, in draft 2020-12.
    fn order_schema_2020() -> Value {
        json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "additionalProperties": false,
            "required": ["items", "card_number"],
            "properties": {
                "items": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 50,
                    "items": {"$ref": "#/$defs/item"}
                },
                "card_number": {"type": "string", "pattern": "^[0-9]{16}$"}
            },
            "$defs": {
                "item": {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["product_id", "quantity"],
                    "properties": {
                        "product_id": {"type": "string", "minLength": 1, "maxLength": 64},
                        "quantity": {"type": "integer", "minimum": 1, "maximum": 100}
                    }
                }
            }
        })
    }

    /// The same body in draft 7 (`definitions`, no `$defs`).
    fn order_schema_draft7() -> Value {
        let mut s = order_schema_2020();
        let defs = s["$defs"].take();
        let o = s.as_object_mut().unwrap();
        o.remove("$defs");
        o.insert("definitions".into(), defs);
        o.insert(
            "$schema".into(),
            json!("http://json-schema.org/draft-07/schema#"),
        );
        s["properties"]["items"]["items"] = json!({"$ref": "#/definitions/item"});
        s
    }

    fn schemas() -> Vec<BodySchema> {
        let s = vec![
            BodySchema::compile(&order_schema_2020(), "routes[0].schema").unwrap(),
            BodySchema::compile(&order_schema_draft7(), "routes[1].schema").unwrap(),
        ];
        assert_eq!(s[0].validator.draft(), jsonschema::Draft::Draft202012);
        assert_eq!(s[1].validator.draft(), jsonschema::Draft::Draft7);
        s
    }

    fn order(items: Value) -> Value {
        json!({"items": items, "card_number": "4111111111111111"})
    }

    async fn refusal(schema: &BodySchema, body: &[u8]) -> ApiError {
        let res = schema.validate(body).expect_err("a refusal");
        let e = crate::guard::tests::api_error(res).await;
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        e
    }

    async fn invalid(schema: &BodySchema, body: &Value) -> String {
        let e = refusal(schema, body.to_string().as_bytes()).await;
        assert_eq!(e.code, "validation_failed", "{}", e.message);
        e.message
    }

    #[test]
    fn a_valid_order_passes_and_comes_back_parsed() {
        let body = order(json!([
            {"product_id": "p-1", "quantity": 1},
            {"product_id": "p-2", "quantity": 100}
        ]));
        for s in schemas() {
            assert_eq!(s.validate(body.to_string().as_bytes()).unwrap(), body);
        }
    }

    #[tokio::test]
    async fn a_quantity_out_of_range_is_named_by_its_pointer() {
        for s in schemas() {
            let m = invalid(&s, &order(json!([{"product_id": "p-1", "quantity": 0}]))).await;
            assert!(
                m.ends_with("/items/0/quantity: value is less than the minimum of 1"),
                "{m}"
            );
            let m = invalid(&s, &order(json!([{"product_id": "p", "quantity": 1}, {"product_id": "p", "quantity": 101}]))).await;
            assert!(
                m.contains("/items/1/quantity: value is greater than the maximum of 100"),
                "{m}"
            );
        }
    }

    #[tokio::test]
    async fn too_many_items() {
        let items: Vec<Value> = (0..101)
            .map(|i| json!({"product_id": format!("p-{i}"), "quantity": 1}))
            .collect();
        for s in schemas() {
            let m = invalid(&s, &order(json!(items))).await;
            assert!(m.contains("/items: value has more than 50 items"), "{m}");
            let m = invalid(&s, &order(json!([]))).await;
            assert!(m.contains("/items: value has less than 1 item"), "{m}");
        }
    }

    #[tokio::test]
    async fn missing_wrong_typed_and_extra_fields() {
        for s in schemas() {
            let m = invalid(&s, &json!({"items": [{"product_id": "p", "quantity": 1}]})).await;
            assert!(
                m.contains("(root): \"card_number\" is a required property"),
                "{m}"
            );
            let m = invalid(&s, &order(json!([{"product_id": "p", "quantity": "2"}]))).await;
            assert!(
                m.contains("/items/0/quantity: value is not of type \"integer\""),
                "{m}"
            );
            let m = invalid(&s, &order(json!({"product_id": "p"}))).await;
            assert!(m.contains("/items: value is not of type \"array\""), "{m}");
            let mut extra = order(json!([{"product_id": "p", "quantity": 1}]));
            extra["coupon"] = json!("FREE");
            let m = invalid(&s, &extra).await;
            assert!(
                m.contains(
                    "(root): Additional properties are not allowed ('coupon' was unexpected)"
                ),
                "{m}"
            );
            let m = invalid(
                &s,
                &order(json!([{"product_id": "p", "quantity": 1, "price": 0}])),
            )
            .await;
            assert!(m.contains("/items/0: Additional properties"), "{m}");
        }
    }

    #[tokio::test]
    async fn values_are_never_quoted_back() {
        for s in schemas() {
            let mut body = order(json!([{"product_id": "x".repeat(65), "quantity": 1}]));
            body["card_number"] = json!("4111 1111 1111 1111");
            let m = invalid(&s, &body).await;
            assert!(
                m.contains("/card_number: value does not match \"^[0-9]{16}$\""),
                "{m}"
            );
            assert!(
                m.contains("/items/0/product_id: value is longer than 64 characters"),
                "{m}"
            );
            assert!(!m.contains("4111") && !m.contains("xxx"), "{m}");
        }
    }

    #[tokio::test]
    async fn many_violations_give_a_bounded_message() {
        let items: Vec<Value> = (0..50)
            .map(|_| json!({"product_id": "p", "quantity": 0}))
            .collect();
        let mut body = order(json!(items));
        body["z".repeat(10_000)] = json!(1);
        for s in schemas() {
            let m = invalid(&s, &body).await;
            assert!(m.ends_with("; …"), "{m}");
            assert_eq!(m.matches("; ").count(), MAX_REPORTED, "{m}");
            assert!(m.len() < 1000, "{}", m.len());
        }
    }

    #[tokio::test]
    async fn malformed_json_says_where() {
        let s = &schemas()[0];
        for (body, needle) in [
            (&b"{\"items\": ["[..], "line 1 column 11"),
            (b"", "line 1 column 0"),
            (
                b"{\"items\": [],\n \"card_number\": 4111 1111}",
                "line 2 column",
            ),
            (b"\xff\xfe", "line 1 column 1"),
        ] {
            let e = refusal(s, body).await;
            assert_eq!(e.code, "malformed_json");
            assert!(e.message.contains(needle), "{needle}: {}", e.message);
        }
    }

    #[tokio::test]
    async fn deep_nesting_is_malformed_not_a_stack_overflow() {
        let body = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let e = refusal(&schemas()[0], body.as_bytes()).await;
        assert_eq!(e.code, "malformed_json");
        assert!(e.message.contains("recursion limit"), "{}", e.message);
        assert!(e.message.len() < 200, "the body is not echoed");
    }

    #[test]
    fn unusable_schemas_are_config_errors() {
        for bad in [
            json!({"type": 12}),
            json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}),
            json!({"$ref": "https://schemas.example/order.json"}),
            json!({"$ref": "file:///etc/order.json"}),
            json!({"type": "string", "pattern": "(unclosed"}),
            json!({"minimum": "one"}),
        ] {
            let e = BodySchema::compile(&bad, "gateway.routes[3].body_schema")
                .map(|_| ())
                .expect_err(&bad.to_string())
                .to_string();
            assert!(
                e.starts_with("gateway.routes[3].body_schema: not a usable JSON Schema"),
                "{e}"
            );
        }
    }
}
