//! The one place the policy pipeline's outcome becomes the sidecar's own
//! HTTP answer, and where its header changes meet a header map.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use palisade_policy::{Action, HeaderOp, Outcome, Refusal};

use super::{Body, error_response, full};

/// The sidecar's answer to a request it does not forward (a refusal, or a
/// CORS preflight), with the outcome's response changes; `None`: forward it.
pub(crate) fn answer(outcome: &Outcome<'_>, grpc: bool) -> Option<Response<Body>> {
    let mut resp = match &outcome.action {
        Action::Refuse(r) => refused(r, grpc),
        Action::Preflight { .. } => {
            let mut resp = Response::new(full(Bytes::new()));
            *resp.status_mut() = StatusCode::NO_CONTENT;
            resp
        }
        Action::Forward => return None,
    };
    outcome.for_each_response_op(|op| apply(resp.headers_mut(), op));
    Some(resp)
}

/// A refusal as an answer: its status (for gRPC, `grpc-status`), a short
/// message, and its headers (`Allow`, `WWW-Authenticate`, `Retry-After`...).
pub(crate) fn refused(r: &Refusal, grpc: bool) -> Response<Body> {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::FORBIDDEN);
    let mut resp = error_response(grpc, status, r.message);
    for (name, value) in &r.headers {
        if let Ok(v) = HeaderValue::from_str(value) {
            resp.headers_mut().insert(*name, v);
        }
    }
    resp
}

/// Applies one header change (names and values were validated when the
/// policy was; a variable's value that is not a valid header value leaves
/// that header out).
pub(crate) fn apply(h: &mut HeaderMap, op: HeaderOp<'_>) {
    let (name, value) = match op {
        HeaderOp::Remove(name) => {
            h.remove(name);
            return;
        }
        HeaderOp::Set(n, v) | HeaderOp::Append(n, v) | HeaderOp::Default(n, v) => (n, v),
    };
    let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) else {
        return;
    };
    match op {
        HeaderOp::Append(..) => {
            h.append(name, value);
        }
        HeaderOp::Default(..) if h.contains_key(&name) => {}
        _ => {
            h.insert(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_changes_apply_as_named() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("x-b", HeaderValue::from_static("keep"));
        apply(&mut h, HeaderOp::Remove("x-a"));
        apply(&mut h, HeaderOp::Default("x-b", "other"));
        apply(&mut h, HeaderOp::Default("x-c", "new"));
        apply(&mut h, HeaderOp::Set("x-d", "1"));
        apply(&mut h, HeaderOp::Append("x-d", "2"));
        apply(&mut h, HeaderOp::Set("x-e", "bad\r\nvalue"));
        assert!(h.get("x-a").is_none());
        assert_eq!(h["x-b"], "keep");
        assert_eq!(h["x-c"], "new");
        assert_eq!(h.get_all("x-d").iter().count(), 2);
        assert!(h.get("x-e").is_none(), "an invalid value is left out");
    }

    #[test]
    fn a_refusal_carries_its_status_message_and_headers() {
        let r = Refusal {
            kind: palisade_policy::Refused::Unauthenticated,
            status: 401,
            message: "unauthenticated",
            headers: vec![("www-authenticate", "Bearer".into())],
            reason: "secret reason".into(),
        };
        let resp = refused(&r, false);
        assert_eq!(resp.status(), 401);
        assert_eq!(resp.headers()["www-authenticate"], "Bearer");
        let grpc = refused(&r, true);
        assert_eq!(grpc.status(), 200);
        assert_eq!(grpc.headers()["grpc-status"], "16");
    }
}
