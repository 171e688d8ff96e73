//! The oslo.messaging wire format over AMQP (captured from oslo.messaging
//! 18.3.1 and RabbitMQ 3.10.8; the declarations are in `docs/broker.md`, a
//! captured call is in the tests below).
//!
//! Every message body is an envelope `{"oslo.version": "2.0", "oslo.message":
//! "<inner JSON as a string>"}`; bare inner objects are accepted too. The
//! inner object of a request carries `method`, `args`, the flattened context
//! (`_context_<key>`), `_unique_id`, and for calls `_msg_id`, `_reply_q` and
//! `_timeout` (the call-monitor interval). A call's timeout travels only in
//! the AMQP `expiration` property.

use serde_json::{Map, Value, json};

use crate::rpc::{Failure, Kind, Reply, Request, Target, new_unique_id};

/// The content type oslo requires on every message (without it a reply is
/// dropped by the Python client).
pub const CONTENT_TYPE: &str = "application/json";
/// The envelope version.
const OSLO_VERSION: &str = "2.0";
/// Context keys are flattened with this prefix.
const CTX_PREFIX: &str = "_context_";

/// Why a delivery could not be read as an oslo request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// Not JSON, or the envelope's inner message is not JSON.
    #[error("not an oslo message: {0}")]
    NotJson(String),
    /// A JSON value that is not an object, or lacks `method`.
    #[error("oslo message without {0}")]
    Missing(&'static str),
}

/// A request read off the broker, plus what only the host side needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    /// The request as it goes to the guest.
    pub request: Request,
    /// `_reply_q` of a call: where its reply is published.
    pub reply_q: Option<String>,
    /// `_timeout` of a call, in seconds: the client's call-monitor interval;
    /// heartbeats go out every half of it while the guest works.
    pub monitor_secs: Option<f64>,
}

fn unwrap_envelope(body: &[u8]) -> Result<Map<String, Value>, WireError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| WireError::NotJson(e.to_string()))?;
    let v = match v.get("oslo.message").and_then(Value::as_str) {
        Some(inner) => {
            serde_json::from_str(inner).map_err(|e| WireError::NotJson(e.to_string()))?
        }
        None => v,
    };
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(WireError::Missing("an object")),
    }
}

fn envelope(inner: &Value) -> Vec<u8> {
    json!({"oslo.version": OSLO_VERSION, "oslo.message": inner.to_string()})
        .to_string()
        .into_bytes()
}

/// Read a request delivered on `topic`. `expiration_ms` is the AMQP
/// `expiration` property (a call's timeout); `fanout` says it came through a
/// fanout exchange.
pub fn decode_request(
    body: &[u8],
    topic: &str,
    server: Option<&str>,
    expiration_ms: Option<u64>,
    fanout: bool,
) -> Result<Incoming, WireError> {
    let mut m = unwrap_envelope(body)?;
    let method = match m.remove("method") {
        Some(Value::String(s)) => s,
        _ => return Err(WireError::Missing("method")),
    };
    let args = m.remove("args").unwrap_or_else(|| json!({}));
    let msg_id = m
        .remove("_msg_id")
        .and_then(|v| v.as_str().map(String::from));
    let reply_q = m
        .remove("_reply_q")
        .and_then(|v| v.as_str().map(String::from));
    let monitor_secs = m.remove("_timeout").and_then(|v| v.as_f64());
    let unique_id = m
        .remove("_unique_id")
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_else(new_unique_id);
    let version = m
        .remove("version")
        .and_then(|v| v.as_str().map(String::from));
    let namespace = m
        .remove("namespace")
        .and_then(|v| v.as_str().map(String::from));
    let mut ctx = Map::new();
    for (k, v) in m {
        if let Some(key) = k.strip_prefix(CTX_PREFIX) {
            ctx.insert(key.to_string(), v);
        }
    }
    // Only a call carries a msg_id into the guest (the proxy swaps it for
    // one of its own); a fanout is never a call.
    let (kind, msg_id) = match (msg_id, fanout) {
        (_, true) => (Kind::Fanout, None),
        (Some(m), false) => (Kind::Call, Some(m)),
        (None, false) => (Kind::Cast, None),
    };
    Ok(Incoming {
        request: Request {
            kind,
            target: Target {
                topic: topic.to_string(),
                server: server.map(String::from),
                namespace,
                version,
                exchange: None,
            },
            method,
            args,
            ctx: Value::Object(ctx),
            msg_id,
            unique_id,
            // The control plane's reply queue never reaches the guest.
            reply_to: None,
            timeout_ms: if kind == Kind::Call {
                expiration_ms
            } else {
                None
            },
        },
        reply_q,
        monitor_secs,
    })
}

/// A failure as oslo serialises it: a JSON string inside the reply.
fn failure_string(f: &Failure) -> String {
    json!({
        "class": f.class,
        "module": f.module,
        "message": f.message,
        "tb": [],
        "args": [f.message],
        "kwargs": {},
    })
    .to_string()
}

/// The body of a reply (final, or a heartbeat with `ending: false`).
pub fn encode_reply(r: &Reply) -> Vec<u8> {
    let failure = r.failure.as_ref().map(failure_string);
    let result = if failure.is_some() {
        Value::Null
    } else {
        r.result.clone().unwrap_or(Value::Null)
    };
    envelope(&json!({
        "result": result,
        "failure": failure,
        "ending": r.ending,
        "_msg_id": r.msg_id,
        "_unique_id": new_unique_id(),
    }))
}

/// A call-monitor heartbeat for `msg_id`: "still working".
pub fn encode_heartbeat(msg_id: &str) -> Vec<u8> {
    envelope(&json!({
        "result": null,
        "failure": null,
        "ending": false,
        "_msg_id": msg_id,
        "_unique_id": new_unique_id(),
    }))
}

/// A guest's request, published upstream; `reply_q` for a call.
pub fn encode_request(r: &Request, reply_q: Option<&str>) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("method".into(), json!(r.method));
    m.insert(
        "args".into(),
        if r.args.is_null() {
            json!({})
        } else {
            r.args.clone()
        },
    );
    if let Some(v) = &r.target.version {
        m.insert("version".into(), json!(v));
    }
    if let Some(n) = &r.target.namespace {
        m.insert("namespace".into(), json!(n));
    }
    if let Value::Object(ctx) = &r.ctx {
        for (k, v) in ctx {
            m.insert(format!("{CTX_PREFIX}{k}"), v.clone());
        }
    }
    m.insert("_unique_id".into(), json!(r.unique_id));
    if let (Kind::Call, Some(msg_id), Some(q)) = (r.kind, &r.msg_id, reply_q) {
        m.insert("_msg_id".into(), json!(msg_id));
        m.insert("_reply_q".into(), json!(q));
        m.insert("_timeout".into(), Value::Null);
    }
    envelope(&Value::Object(m))
}

/// A guest's notification (already checked and stamped by the enforcement
/// point), as oslo's notifier publishes one: its fields, the context as
/// `_context_*` keys and `_unique_id`, in the 2.0 envelope.
pub fn encode_notification(r: &Request) -> Vec<u8> {
    let mut m = match &r.args {
        Value::Object(body) => body.clone(),
        _ => Map::new(),
    };
    m.entry("message_id")
        .or_insert_with(|| json!(r.unique_id.clone()));
    if let Value::Object(ctx) = &r.ctx {
        for (k, v) in ctx {
            m.insert(format!("{CTX_PREFIX}{k}"), v.clone());
        }
    }
    m.insert("_unique_id".into(), json!(r.unique_id));
    envelope(&Value::Object(m))
}

/// Read a reply off the proxy's reply queue.
pub fn decode_reply(body: &[u8]) -> Result<Reply, WireError> {
    let m = unwrap_envelope(body)?;
    let msg_id = m
        .get("_msg_id")
        .and_then(Value::as_str)
        .ok_or(WireError::Missing("_msg_id"))?
        .to_string();
    let ending = m.get("ending").and_then(Value::as_bool).unwrap_or(true);
    let failure = match m.get("failure") {
        Some(Value::String(s)) => {
            let f: Value = serde_json::from_str(s).unwrap_or_else(|_| json!({"message": s}));
            let field =
                |k: &str, d: &str| f.get(k).and_then(Value::as_str).unwrap_or(d).to_string();
            Some(Failure {
                class: field("class", "RemoteError"),
                module: field("module", "oslo_messaging"),
                message: field("message", ""),
            })
        }
        _ => None,
    };
    Ok(Reply {
        msg_id,
        reply_to: None,
        result: if failure.is_some() {
            None
        } else {
            Some(m.get("result").cloned().unwrap_or(Value::Null))
        },
        failure,
        ending,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call exactly as oslo.messaging 18.3 sent it (notes).
    const CALL: &str = r#"{"oslo.version": "2.0", "oslo.message": "{\"method\": \"echo\", \"args\": {\"value\": \"hello\", \"n\": 3}, \"version\": \"1.2\", \"_msg_id\": \"32688790da624d969167cd4f42097506\", \"_reply_q\": \"reply_4f24c229007545fcb07b483bc6240ba2\", \"_timeout\": null, \"_unique_id\": \"0d611417532e4138bd7d649f0455d5c6\", \"_context_user\": \"u-1\", \"_context_roles\": [], \"_context_is_admin\": false}"}"#;

    #[test]
    fn a_captured_oslo_call_decodes() {
        let i =
            decode_request(CALL.as_bytes(), "agent", Some("vm-1"), Some(10_000), false).unwrap();
        let r = &i.request;
        assert_eq!(r.kind, Kind::Call);
        assert_eq!(r.reply_to, None, "the reply queue stays on the host");
        assert_eq!(r.method, "echo");
        assert_eq!(r.args, json!({"value": "hello", "n": 3}));
        assert_eq!(
            r.msg_id.as_deref(),
            Some("32688790da624d969167cd4f42097506")
        );
        assert_eq!(r.unique_id, "0d611417532e4138bd7d649f0455d5c6");
        assert_eq!(r.timeout_ms, Some(10_000));
        assert_eq!(r.target.version.as_deref(), Some("1.2"));
        assert_eq!(
            r.ctx,
            json!({"user": "u-1", "roles": [], "is_admin": false})
        );
        assert_eq!(
            i.reply_q.as_deref(),
            Some("reply_4f24c229007545fcb07b483bc6240ba2")
        );
        assert_eq!(i.monitor_secs, None);
    }

    #[test]
    fn casts_fanouts_and_bare_messages() {
        let cast = br#"{"method": "ping", "args": {}, "_unique_id": "u1", "_timeout": 4}"#;
        let i = decode_request(cast, "t", None, Some(5), false).unwrap();
        assert_eq!(i.request.kind, Kind::Cast);
        assert_eq!(i.request.timeout_ms, None, "casts carry no deadline");
        let f = decode_request(cast, "t", None, None, true).unwrap();
        assert_eq!(f.request.kind, Kind::Fanout);
        let f = decode_request(CALL.as_bytes(), "t", None, None, true).unwrap();
        assert_eq!((f.request.kind, f.request.msg_id), (Kind::Fanout, None));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for b in [
            &b"\xff\xfe"[..],
            b"[]",
            b"{}",
            br#"{"oslo.message": "not json"}"#,
            br#"{"method": 3}"#,
        ] {
            assert!(decode_request(b, "t", None, None, false).is_err(), "{b:?}");
        }
        assert!(decode_reply(br#"{"result": 1}"#).is_err());
    }

    #[test]
    fn replies_have_the_shape_the_python_client_accepts() {
        let ok = Reply::new("m1".into(), None, Ok(json!({"x": 1})));
        let v: Value = serde_json::from_slice(&encode_reply(&ok)).unwrap();
        let inner: Value = serde_json::from_str(v["oslo.message"].as_str().unwrap()).unwrap();
        assert_eq!(inner["result"], json!({"x": 1}));
        assert_eq!(inner["failure"], Value::Null);
        assert_eq!(inner["ending"], true);
        assert_eq!(inner["_msg_id"], "m1");

        let f = Failure {
            class: "ValueError".into(),
            module: "builtins".into(),
            message: "boom".into(),
        };
        let bad = Reply::new("m2".into(), None, Err(f.clone()));
        let body = encode_reply(&bad);
        let v: Value = serde_json::from_slice(&body).unwrap();
        let inner: Value = serde_json::from_str(v["oslo.message"].as_str().unwrap()).unwrap();
        // The failure is a JSON *string*: an object breaks the Python client.
        let fs: Value = serde_json::from_str(inner["failure"].as_str().unwrap()).unwrap();
        assert_eq!(fs["class"], "ValueError");
        assert_eq!(fs["module"], "builtins");
        assert_eq!(decode_reply(&body).unwrap().failure, Some(f));

        let hb: Value = serde_json::from_slice(&encode_heartbeat("m3")).unwrap();
        let inner: Value = serde_json::from_str(hb["oslo.message"].as_str().unwrap()).unwrap();
        assert_eq!(inner["ending"], false);
        assert_eq!(inner["failure"], Value::Null);
    }

    #[test]
    fn upstream_requests_round_trip() {
        let r = Request {
            kind: Kind::Call,
            target: Target {
                topic: "conductor".into(),
                ..Default::default()
            },
            method: "report".into(),
            args: json!({"load": 3}),
            ctx: json!({"tether_instance": "i-1"}),
            msg_id: Some("m".into()),
            unique_id: "u".into(),
            reply_to: None,
            timeout_ms: Some(1000),
        };
        let body = encode_request(&r, Some("reply_q1"));
        let i = decode_request(&body, "conductor", None, Some(1000), false).unwrap();
        assert_eq!(i.request.method, "report");
        assert_eq!(i.request.args, json!({"load": 3}));
        assert_eq!(i.request.ctx, json!({"tether_instance": "i-1"}));
        assert_eq!(i.reply_q.as_deref(), Some("reply_q1"));
    }

    #[test]
    fn a_notification_is_encoded_as_oslos_notifier_does() {
        let r = Request {
            kind: Kind::Notify,
            target: Target {
                topic: "notifications.info".into(),
                ..Default::default()
            },
            method: "lbaas.pool.update".into(),
            args: json!({"event_type": "lbaas.pool.update", "priority": "INFO", "payload": {"p": 1}, "publisher_id": "tether.vm-1"}),
            ctx: json!({"tether_instance": "vm-1", "request_id": "r-1"}),
            msg_id: None,
            unique_id: "u-1".into(),
            reply_to: None,
            timeout_ms: None,
        };
        let outer: Value = serde_json::from_slice(&encode_notification(&r)).unwrap();
        assert_eq!(outer["oslo.version"], "2.0");
        let m: Value = serde_json::from_str(outer["oslo.message"].as_str().unwrap()).unwrap();
        assert_eq!(m["event_type"], "lbaas.pool.update");
        assert_eq!(m["payload"], json!({"p": 1}));
        assert_eq!(m["message_id"], "u-1");
        assert_eq!(m["_unique_id"], "u-1");
        assert_eq!(m["_context_tether_instance"], "vm-1");
        assert_eq!(m["_context_request_id"], "r-1");
    }
}
