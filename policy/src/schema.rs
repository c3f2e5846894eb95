//! `validation.jsonSchema`: JSON request bodies checked against a JSON
//! Schema (draft 2020-12 unless the schema's `$schema` names another) before
//! the app sees them. Refusals are RFC 9457 problem details that say which
//! field failed and why, without echoing large input.
//!
//! Schemas are compiled when the policy is, never per request. Patterns use
//! the `regex` engine (linear time: no pattern can be made to backtrack on
//! hostile input), `format` is checked, and `$ref` resolves only inside the
//! schema (nothing is fetched).

use std::sync::Arc;

use serde_json::Value;

/// Largest schema, serialized.
pub const MAX_SCHEMA_BYTES: usize = 64 * 1024;
/// Most errors listed in one refusal.
const MAX_ERRORS: usize = 10;
/// Longest error detail.
const MAX_DETAIL: usize = 200;
/// Instances longer than this (as JSON) are not echoed in an error detail.
const MAX_ECHO: usize = 64;

/// A compiled schema.
#[derive(Clone)]
pub struct Schema {
    source: Value,
    validator: Arc<jsonschema::Validator>,
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schema").field("source", &self.source).finish_non_exhaustive()
    }
}

impl PartialEq for Schema {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}
impl Eq for Schema {}

/// Why a request body was refused: an RFC 9457 problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `namespace/name` of the policy.
    pub policy: String,
    /// What went wrong, in one sentence.
    pub title: &'static str,
    /// A short explanation.
    pub detail: String,
    /// `(JSON pointer, keyword, detail)` per failed check, at most 10.
    pub errors: Vec<(String, String, String)>,
}

impl Problem {
    /// The `application/problem+json` body.
    pub fn to_json(&self) -> String {
        // Written by hand so the members come in the RFC's order.
        let q = |s: &str| Value::String(s.to_string()).to_string();
        let mut out = format!(
            r#"{{"type":"tag:palisade.dev,2026:invalid-request-body","title":{},"status":400,"detail":{}"#,
            q(self.title),
            q(&self.detail)
        );
        if !self.errors.is_empty() {
            let errors: Vec<String> = self
                .errors
                .iter()
                .map(|(p, k, d)| {
                    format!(r#"{{"pointer":{},"keyword":{},"detail":{}}}"#, q(&format!("#{p}")), q(k), q(d))
                })
                .collect();
            out.push_str(&format!(r#","errors":[{}]"#, errors.join(",")));
        }
        out.push('}');
        out
    }

    /// One line for the audit log.
    pub fn reason(&self) -> String {
        match self.errors.first() {
            Some((p, k, d)) => format!("{} ({}): first at #{p} ({k}): {d}", self.title, self.detail),
            None => format!("{}: {}", self.title, self.detail),
        }
    }
}

fn cut(mut s: String) -> String {
    if s.len() > MAX_DETAIL {
        let mut end = MAX_DETAIL;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

impl Schema {
    /// Compiles a schema (`Err`: why it is not one).
    pub fn compile(source: &Value) -> Result<Self, String> {
        let size = serde_json::to_vec(source).map(|v| v.len()).unwrap_or(usize::MAX);
        if size > MAX_SCHEMA_BYTES {
            return Err(format!("is {size} bytes; at most {MAX_SCHEMA_BYTES}"));
        }
        if !source.is_object() && !source.is_boolean() {
            return Err("must be a JSON Schema: an object (or true/false)".into());
        }
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .with_pattern_options(jsonschema::PatternOptions::regex().size_limit(1 << 20))
            .build(source)
            .map_err(|e| cut(format!("is not a valid JSON Schema: {e}")))?;
        Ok(Self { source: source.clone(), validator: Arc::new(validator) })
    }

    /// The schema as written.
    pub fn source(&self) -> &Value {
        &self.source
    }

    /// Checks a JSON body; `policy` names the policy in the refusal.
    pub fn check(&self, policy: &str, body: &[u8]) -> Result<(), Problem> {
        let instance = serde_json::from_slice::<Strict>(body).map(|s| s.0).map_err(|e| Problem {
            policy: policy.to_string(),
            title: "Request body is not valid JSON",
            // serde_json's message names the line and column, never the input.
            detail: cut(e.to_string()),
            errors: Vec::new(),
        })?;
        let mut errors = Vec::new();
        let mut total = 0usize;
        for e in self.validator.iter_errors(&instance) {
            total += 1;
            if errors.len() == MAX_ERRORS {
                continue;
            }
            let keyword = e.schema_path().as_str().rsplit('/').next().unwrap_or_default().to_string();
            let mut detail = e.to_string();
            let echoed = serde_json::to_string(e.instance().as_ref()).unwrap_or_default();
            if echoed.len() > MAX_ECHO
                && let Some(rest) = detail.strip_prefix(echoed.as_str())
            {
                detail = format!("the value{rest}");
            }
            errors.push((e.instance_path().as_str().to_string(), keyword, cut(detail)));
        }
        if total == 0 {
            return Ok(());
        }
        Err(Problem {
            policy: policy.to_string(),
            title: "Request body does not match the schema",
            detail: format!("{total} error{} in the request body", if total == 1 { "" } else { "s" }),
            errors,
        })
    }
}

/// A JSON value parsed strictly: an object with a key given twice is
/// refused. Parsers disagree on which of the two counts (the last here,
/// the first in some apps), so checking one and delivering both would let
/// a body past the schema.
struct Strict(Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
        Ok(Value::from(n))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
        Ok(Value::from(n))
    }
    fn visit_f64<E>(self, n: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_string()))
    }
    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if out.contains_key(&k) {
                return Err(serde::de::Error::custom("an object key given twice"));
            }
            let Strict(v) = map.next_value()?;
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

/// Whether a `Content-Type` names JSON (`application/json`, `*/*+json`).
pub fn is_json(content_type: Option<&str>) -> bool {
    let mt = content_type.unwrap_or_default().split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    mt == "application/json" || (mt.starts_with("application/") && mt.ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order_schema() -> Schema {
        Schema::compile(&serde_json::json!({
            "type": "object",
            "required": ["item", "qty"],
            "additionalProperties": false,
            "properties": {
                "item": {"type": "string", "pattern": "^[a-z-]+$", "maxLength": 32},
                "qty": {"type": "integer", "minimum": 1},
                "email": {"type": "string", "format": "email"},
                "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}}
            },
            "$defs": {"tag": {"type": "string", "maxLength": 8}}
        }))
        .unwrap()
    }

    #[test]
    fn valid_bodies_pass_and_failures_name_the_field() {
        let s = order_schema();
        assert_eq!(s.check("shop/p", br#"{"item":"tea","qty":2,"tags":["a"]}"#), Ok(()));
        let p = s.check("shop/p", br#"{"item":"Tea!","qty":0}"#).unwrap_err();
        assert_eq!(p.title, "Request body does not match the schema");
        let pointers: Vec<&str> = p.errors.iter().map(|e| e.0.as_str()).collect();
        assert!(pointers.contains(&"/item") && pointers.contains(&"/qty"), "{p:?}");
        let kw: Vec<&str> = p.errors.iter().map(|e| e.1.as_str()).collect();
        assert!(kw.contains(&"pattern") && kw.contains(&"minimum"), "{p:?}");
        let body: Value = serde_json::from_str(&p.to_json()).unwrap();
        assert_eq!(body["status"], 400);
        assert!(body["errors"][0]["pointer"].as_str().unwrap().starts_with("#/"));
        assert_eq!(s.check("shop/p", br#"{"item":"x","qty":1,"email":"nope"}"#).unwrap_err().errors[0].1, "format");
        assert_eq!(
            s.check("shop/p", br#"{"item":"x","qty":1,"tags":["toolongtag"]}"#).unwrap_err().errors[0].0,
            "/tags/0"
        );
        assert_eq!(
            s.check("shop/p", br#"{"item":"x","qty":1,"admin":true}"#).unwrap_err().errors[0].1,
            "additionalProperties"
        );
    }

    #[test]
    fn large_input_is_not_echoed_and_garbage_is_not_json() {
        let s = order_schema();
        let big = format!(r#"{{"item":"{}","qty":1}}"#, "a".repeat(10_000));
        let p = s.check("shop/p", big.as_bytes()).unwrap_err();
        let json = p.to_json();
        assert!(json.len() < 1000 && !json.contains("aaaaaaaaaa"), "{json}");
        let p = s.check("shop/p", b"{\"item\": ").unwrap_err();
        assert_eq!(p.title, "Request body is not valid JSON");
        let p = s.check("shop/p", br#"{"item":"tea","qty":0,"qty":1}"#).unwrap_err();
        assert!(p.title.contains("not valid JSON") && p.detail.contains("given twice"), "{p:?}");
        assert_eq!(
            s.check("shop/p", br#"{"item":"tea","qty":1,"tags":[{"a":1},{"a":2}]}"#).unwrap_err().errors[0].1,
            "type"
        );
        let deep = "[".repeat(10_000);
        assert!(s.check("shop/p", deep.as_bytes()).is_err(), "nesting is bounded");
        let many = format!("[{}1]", "1,".repeat(100));
        let arr = Schema::compile(&serde_json::json!({"type": "array", "items": {"type": "string"}})).unwrap();
        let p = arr.check("shop/p", many.as_bytes()).unwrap_err();
        assert_eq!((p.errors.len(), p.detail.as_str()), (10, "101 errors in the request body"));
    }

    #[test]
    fn bad_schemas_and_remote_refs_are_refused() {
        assert!(Schema::compile(&serde_json::json!({"type": "nope"})).is_err());
        assert!(Schema::compile(&serde_json::json!({"$ref": "https://example.com/s.json"})).is_err());
        assert!(Schema::compile(&serde_json::json!("string")).is_err());
        assert!(Schema::compile(&serde_json::json!({"pattern": "(a"})).is_err());
        // A pattern that backtracks catastrophically elsewhere runs in linear time here.
        let s = Schema::compile(&serde_json::json!({"type": "string", "pattern": "^(a+)+$"})).unwrap();
        let evil = format!("\"{}b\"", "a".repeat(5000));
        assert!(s.check("p", evil.as_bytes()).is_err());
        assert!(is_json(Some("application/json; charset=utf-8")) && is_json(Some("application/merge-patch+json")));
        assert!(!is_json(Some("text/plain")) && !is_json(None));
    }
}
