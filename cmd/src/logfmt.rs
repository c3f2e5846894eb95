//! The human log format's fields, escaped: a log line is one event, whatever
//! its values hold.
//!
//! tracing-subscriber writes a `%value` (Display) field as it is, so a value
//! from outside holding a newline (a sidecar's NACK text, a path, a header)
//! would start a line of its own, which reads like any other event, an
//! audit one included. Here every field and message is written with control
//! characters and Unicode line separators escaped (`\n`, `\u{1b}`), so no
//! value can forge a line. Values from outside are also written quoted by
//! their call sites (`palisade_telemetry::Untrusted`), so they cannot pass
//! for another field either. The JSON format escapes by itself.

use std::fmt::{self, Write};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;

/// Formats fields as tracing-subscriber's default does (`message` first,
/// then `name=value`), with control characters escaped.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct EscapedFields;

impl<'w> FormatFields<'w> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut v = Visitor { w: writer, seen: false, result: Ok(()) };
        fields.record(&mut v);
        v.result
    }
}

struct Visitor<'w> {
    w: Writer<'w>,
    seen: bool,
    result: fmt::Result,
}

impl Visitor<'_> {
    fn write(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        let name = field.name();
        // Fields the `log` bridge adds (log.target, log.file...) are shown
        // in the line's prefix already.
        if self.result.is_err() || name.starts_with("log.") {
            return;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        let sep = if self.seen { " " } else { "" };
        self.seen = true;
        self.result = if name == "message" {
            write!(self.w, "{sep}").and_then(|()| write!(Escaping(&mut self.w), "{value}"))
        } else {
            write!(self.w, "{sep}{name}=").and_then(|()| write!(Escaping(&mut self.w), "{value}"))
        };
    }
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        // As the default format: a message as it is (escaped), another string quoted.
        if field.name() == "message" {
            self.write(field, format_args!("{value}"));
        } else {
            self.write(field, format_args!("{value:?}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.write(field, format_args!("{value:?}"));
    }
}

/// Passes text on with control characters escaped.
struct Escaping<'a, W>(&'a mut W);

impl<W: Write> Write for Escaping<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(i) = rest.find(|c: char| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')) {
            self.0.write_str(&rest[..i])?;
            let c = rest[i..].chars().next().expect("invariant: find returned a char boundary");
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                c => write!(self.0, "\\u{{{:x}}}", c as u32)?,
            }
            rest = &rest[i + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn no_value_starts_a_line_of_its_own() {
        let buf = Buf::default();
        let out = buf.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(move || out.clone())
            .with_ansi(false)
            .fmt_fields(super::EscapedFields);
        let subscriber = tracing_subscriber::registry().with(layer);
        let forged = "v1\n2025-01-01T00:00:00.000000Z  INFO audit: event=\"admin_authorized\"";
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("conn", src.addr = %"a\rb");
            let _e = span.enter();
            tracing::warn!(target: "audit", event = "config_nack", version = %forged, error = ?forged, plain = forged, r#type = 1, "nack {}", "x\ny");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("conn{src.addr=a\\rb}"), "{text}");
        assert!(text.contains("nack x\\ny event=\"config_nack\" version=v1\\n2025"), "{text}");
        assert!(text.contains("error=\"v1\\n2025"), "{text}");
        assert!(text.contains("plain=\"v1\\n2025"), "{text}");
        assert!(text.contains(" type=1"), "{text}");
    }
}
