//! TrafficPolicy JSON Schema validation of request bodies: any bytes get a
//! pass or an RFC 9457 problem, never a panic; a problem is valid JSON,
//! bounded in size, and lists at most 10 errors.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use palisade_policy::schema::Schema;

static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    Schema::compile(&serde_json::json!({
        "type": "object",
        "required": ["item", "qty"],
        "additionalProperties": false,
        "properties": {
            "item": {"type": "string", "pattern": "^[a-z-]+$", "maxLength": 32},
            "qty": {"type": "integer", "minimum": 1, "maximum": 100},
            "email": {"type": "string", "format": "email"},
            "when": {"type": "string", "format": "date-time"},
            "tags": {"type": "array", "maxItems": 8, "items": {"$ref": "#/$defs/tag"}},
            "lines": {"type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string"}}}}
        },
        "$defs": {"tag": {"type": "string", "maxLength": 8}}
    }))
    .expect("invariant: a valid schema")
});

fuzz_target!(|input: &[u8]| {
    let Err(problem) = SCHEMA.check("fuzz/p", input) else { return };
    let json = problem.to_json();
    let v: serde_json::Value = serde_json::from_str(&json).expect("a problem is JSON");
    assert_eq!(v["status"], 400);
    assert!(problem.errors.len() <= 10);
    assert!(json.len() <= 10 * 700 + 512, "bounded: {} bytes", json.len());
});
