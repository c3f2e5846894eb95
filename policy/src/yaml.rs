//! Policy text as people write it: YAML (several documents) or JSON. A
//! cargo feature, so the sidecar, which only ever receives JSON from the
//! control plane, carries no YAML parser.

use crate::{PolicyError, Resource};

/// YAML (multi-document) or JSON text -> validated resources.
pub fn parse_text(text: &str) -> Result<Vec<Resource>, PolicyError> {
    let t = text.trim_start();
    if t.starts_with('{') || t.starts_with('[') {
        return Resource::parse_json(text);
    }
    let docs = serde_saphyr::from_multiple::<serde_json::Value>(text)
        .map_err(|e| PolicyError::Parse { what: "YAML".into(), message: e.to_string() })?;
    Resource::from_values(docs)
}
