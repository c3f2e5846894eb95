//! Validation of a `TrafficPolicy` spec, field by field, with the path of
//! the first field that is wrong.

use super::rewrites::parse_template;
use super::{SecurityHeaders, Setting, TrafficSpec};
use crate::resource::spec::reserved_header;

fn name_ok(h: &str) -> bool {
    !h.is_empty() && h.len() <= 128 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
}

fn value_ok(v: &str) -> bool {
    v.len() <= 4096 && v.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
}

/// Validates a spec; errors are `(field path, value, why)`.
pub(crate) fn validate(spec: &TrafficSpec) -> Result<(), (String, String, String)> {
    let err = |f: String, v: &str, why: &str| Err((f, v.to_string(), why.to_string()));
    for (dir, ops) in [("requestHeaders", &spec.request_headers), ("responseHeaders", &spec.response_headers)] {
        let Some(ops) = ops else { continue };
        for (kind, map) in [("set", &ops.set), ("add", &ops.add)] {
            for (name, value) in map {
                let f = format!("spec.{dir}.{kind}.{name}");
                if !name_ok(name) || reserved_header(name) {
                    return err(
                        f,
                        name,
                        "must be a header name Palisade does not reserve (x-palisade-*, host, content-length, ...)",
                    );
                }
                if !value_ok(value) {
                    return err(f, value, "must be visible ASCII, at most 4096 bytes");
                }
                if let Err(why) = parse_template(value) {
                    return err(f, value, &why);
                }
            }
        }
        for (i, name) in ops.remove.iter().enumerate() {
            if !name_ok(name) || reserved_header(name) {
                return err(format!("spec.{dir}.remove[{i}]"), name, "must be a header name Palisade does not reserve");
            }
        }
    }
    if let Some(v) = &spec.validation {
        for (i, m) in v.methods.iter().enumerate() {
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                return err(
                    format!("spec.validation.methods[{i}]"),
                    m,
                    "must be an HTTP method in upper case (GET, POST, ...)",
                );
            }
        }
        for (i, ct) in v.content_types.iter().enumerate() {
            let ok = ct.split_once('/').is_some_and(|(t, s)| {
                let token = |x: &str| {
                    !x.is_empty() && x.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
                };
                token(t) && (s == "*" || token(s))
            });
            if !ok {
                return err(
                    format!("spec.validation.contentTypes[{i}]"),
                    ct,
                    "must be a media type such as application/json, or text/*",
                );
            }
        }
        if let Some(schema) = &v.json_schema
            && let Err(why) = crate::schema::Schema::compile(schema)
        {
            let mut text = schema.to_string();
            if text.len() > 60 {
                let mut end = 60;
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text.truncate(end);
                text.push('…');
            }
            return err("spec.validation.jsonSchema".into(), &text, &why);
        }
        if v.max_body_bytes == Some(0) {
            return err("spec.validation.maxBodyBytes".into(), "0", "must be at least 1 (leave it out for no limit)");
        }
    }
    if let Some(c) = &spec.cors {
        if c.allow_origins.is_empty() {
            return err("spec.cors.allowOrigins".into(), "", "must list at least one origin (or \"*\")");
        }
        for (i, o) in c.allow_origins.iter().enumerate() {
            let f = format!("spec.cors.allowOrigins[{i}]");
            if o == "*" {
                if c.allow_credentials {
                    return err(
                        f,
                        o,
                        "cannot be combined with allowCredentials: name the origins that may send credentials",
                    );
                }
                continue;
            }
            if o == "null" {
                continue;
            }
            let Some((scheme, host)) = o.split_once("://") else {
                return err(f, o, "must be an origin: scheme://host[:port], e.g. https://app.example.com");
            };
            let host_ok = !host.is_empty()
                && !host.contains(['/', '?', '#', '@', ' '])
                && (!host.contains('*')
                    || (host.starts_with("*.") && !host[2..].contains('*') && host[2..].contains('.')));
            if !["http", "https"].contains(&scheme) || !host_ok {
                return err(
                    f,
                    o,
                    "must be an origin: http(s)://host[:port], or https://*.example.com (the * is one label)",
                );
            }
        }
        for (i, m) in c.allow_methods.iter().enumerate() {
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                return err(format!("spec.cors.allowMethods[{i}]"), m, "must be an HTTP method in upper case");
            }
        }
        for (list, field) in [(&c.allow_headers, "allowHeaders"), (&c.expose_headers, "exposeHeaders")] {
            for (i, h) in list.iter().enumerate() {
                if !name_ok(h) {
                    return err(format!("spec.cors.{field}[{i}]"), h, "must be a header name");
                }
            }
        }
        if c.max_age.is_some_and(|a| a > 86400) {
            return err(
                "spec.cors.maxAge".into(),
                &c.max_age.unwrap_or(0).to_string(),
                "must be at most 86400 (a day)",
            );
        }
    }
    crate::route::validate(&spec.routes)?;
    if let Some(b) = &spec.balancing {
        crate::resilience::validate_balancing(b)?;
    }
    if let Some(sec) = &spec.security_headers {
        for (field, setting) in sec.settings() {
            let value = match setting {
                Setting::Flag(_) => continue,
                Setting::Value(v) | Setting::Full { value: v, .. } => v,
            };
            if value.is_empty() || !value_ok(value) {
                return err(format!("spec.securityHeaders.{field}"), value, "must be a non-empty visible ASCII value");
            }
        }
    }
    Ok(())
}

impl SecurityHeaders {
    fn settings(&self) -> Vec<(&'static str, &Setting)> {
        [
            ("hsts", &self.hsts),
            ("contentTypeOptions", &self.content_type_options),
            ("frameOptions", &self.frame_options),
            ("contentSecurityPolicy", &self.content_security_policy),
            ("referrerPolicy", &self.referrer_policy),
            ("permissionsPolicy", &self.permissions_policy),
        ]
        .into_iter()
        .filter_map(|(f, s)| s.as_ref().map(|s| (f, s)))
        .collect()
    }
}
