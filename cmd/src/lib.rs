//! The conventions every Palisade program keeps as a command-line tool, in
//! one place so the three binaries cannot drift apart:
//!
//! - exit status 0 for `--help` and `--version` (on every subcommand), 64
//!   (`EX_USAGE`) for a usage error or a bad flag value, clap's own errors
//!   included, and 1 when the program cannot do its job;
//! - colour only on a terminal, never with `NO_COLOR` set (log files and
//!   pipes get plain text);
//! - a closed pipe on standard output (`palisadectl install | head`) ends the
//!   program quietly instead of a panic.

use std::io::{IsTerminal, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

mod logfmt;

/// Exit status for a usage error or a bad flag value (sysexits.h `EX_USAGE`).
pub const EXIT_USAGE: i32 = 64;

/// Exit status when the program cannot do what was asked.
pub const EXIT_FAILURE: i32 = 1;

/// Parses the process's arguments. `--help`/`--version` print and exit 0;
/// any usage error prints clap's message (with colour only where allowed)
/// and exits [`EXIT_USAGE`].
pub fn parse<T: clap::Parser>() -> T {
    parse_from(std::env::args_os())
}

/// [`parse`] over the given arguments (the first is the program name).
pub fn parse_from<T, I, A>(args: I) -> T
where
    T: clap::Parser,
    I: IntoIterator<Item = A>,
    A: Into<std::ffi::OsString> + Clone,
{
    let mut matches = matches_from(T::command(), args);
    T::from_arg_matches_mut(&mut matches).unwrap_or_else(|e| exit_on(e))
}

/// Matches the process's arguments against a hand-assembled command (one
/// whose subcommands come from several structs), with [`parse`]'s exits.
pub fn matches(cmd: clap::Command) -> clap::ArgMatches {
    matches_from(cmd, std::env::args_os())
}

fn matches_from<I, A>(cmd: clap::Command, args: I) -> clap::ArgMatches
where
    I: IntoIterator<Item = A>,
    A: Into<std::ffi::OsString> + Clone,
{
    let color = if color_allowed(&std::io::stderr()) { clap::ColorChoice::Auto } else { clap::ColorChoice::Never };
    cmd.color(color).try_get_matches_from(args).unwrap_or_else(|e| exit_on(e))
}

/// Prints a clap error (or help/version) and exits with the convention's status.
pub fn exit_on(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    let code = match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => 0,
        _ => EXIT_USAGE,
    };
    // clap prints help to stdout and errors to stderr; a closed pipe is not an error.
    let _ = e.print();
    std::process::exit(code)
}

/// An error in what the user typed or gave (a flag's value, an argument, an
/// input file): a program that meets one after clap has parsed the command
/// line exits [`EXIT_USAGE`], as clap does for its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// `1 proxy`, `0 proxies`, `2 proxies`: a count with the noun in the number
/// it takes in English (`one` for exactly 1, `many` otherwise).
pub fn plural(n: impl std::fmt::Display, one: &str, many: &str) -> String {
    let n = n.to_string();
    let noun = if n == "1" { one } else { many };
    format!("{n} {noun}")
}

/// Whether a stream may carry ANSI colour: it is a terminal and `NO_COLOR`
/// (<https://no-color.org>) is unset or empty.
pub fn color_allowed(stream: &impl IsTerminal) -> bool {
    stream.is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Log output format (`--log-format`), shared by the daemons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// For people.
    Human,
    /// One JSON object a line.
    Json,
}

/// Installs the global `tracing` subscriber writing to standard error.
/// `filter` is a list of directives, `LEVEL` and `TARGET=LEVEL` separated by
/// commas (`info`, `info,audit=debug`, `palisade_sidecar::proxy=trace`); a
/// bad one is a usage error and the message names `flag`. (Targets, not
/// EnvFilter: span-field directives are not needed, and EnvFilter's regex
/// engine was a tenth of the sidecar's resident code.)
pub fn init_logging(flag: &str, filter: &str, format: LogFormat) -> Result<(), String> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let targets: tracing_subscriber::filter::Targets = filter
        .parse()
        .map_err(|e| format!("{flag} {filter:?}: {e} (expected LEVEL or TARGET=LEVEL, comma-separated)"))?;
    let fmt =
        tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(color_allowed(&std::io::stderr()));
    let registry = tracing_subscriber::registry().with(targets);
    match format {
        // serde_json escapes every string it writes.
        LogFormat::Json => registry.with(fmt.json()).init(),
        // Escaped: a value from outside cannot start a forged line.
        LogFormat::Human => registry.with(fmt.fmt_fields(logfmt::EscapedFields)).init(),
    }
    Ok(())
}

/// Writes to standard output; when the reader has gone away (a closed pipe)
/// the program ends quietly with status 0, as `head` expects of its writers.
/// Any other write error ends it with [`EXIT_FAILURE`].
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    // What the programs print holds values that workloads sent (a NACK's
    // text, a recorded path): no control character but line ends and tabs
    // reaches the operator's terminal (ESC sequences could hide, recolour or
    // rewrite what is shown; a CR could overwrite a line).
    let raw = args.to_string();
    let text = neutralise_controls(&raw);
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        let _ = writeln!(std::io::stderr(), "error: cannot write to standard output: {e}");
        std::process::exit(EXIT_FAILURE);
    }
}

/// `text` with every control character other than `\n` and `\t` (C0, DEL,
/// C1, and the Unicode line and paragraph separators) written as `\u{..}`.
pub fn neutralise_controls(text: &str) -> std::borrow::Cow<'_, str> {
    let bad = |c: char| (c.is_control() && c != '\n' && c != '\t') || matches!(c, '\u{2028}' | '\u{2029}');
    if !text.chars().any(bad) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if bad(c) {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// `print!` that ends the program quietly on a closed pipe (see [`write_stdout`]).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::write_stdout(format_args!($($arg)*)) };
}

/// `println!` that ends the program quietly on a closed pipe (see [`write_stdout`]).
#[macro_export]
macro_rules! outln {
    () => { $crate::write_stdout(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::write_stdout(format_args!("{}\n", format_args!($($arg)*))) };
}

/// Panics unless the command tree is consistent (clap's own debug checks)
/// and documented (see [`undocumented`]): each binary's unit test calls it.
pub fn assert_documented(cmd: clap::Command) {
    cmd.clone().debug_assert();
    assert_eq!(undocumented(&cmd), Vec::<String>::new(), "flags or subcommands without help text");
}

/// Checks a command tree against the conventions a user relies on: every
/// argument and subcommand has help text. Returns what is missing, by path.
pub fn undocumented(cmd: &clap::Command) -> Vec<String> {
    fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            let id = a.get_id().as_str();
            if matches!(id, "help" | "version") || a.is_hide_set() {
                continue;
            }
            if a.get_help().is_none() && a.get_long_help().is_none() {
                missing.push(format!("{path} {id}"));
            }
        }
        for s in cmd.get_subcommands() {
            if s.is_hide_set() || s.get_name() == "help" {
                continue;
            }
            let sub = format!("{path} {}", s.get_name());
            if s.get_about().is_none() && s.get_long_about().is_none() {
                missing.push(sub.clone());
            }
            walk(s, &sub, missing);
        }
    }
    let mut missing = Vec::new();
    walk(cmd, cmd.get_name(), &mut missing);
    missing
}

/// A ratio flag (`--trace-sampling 0.01`): between 0 and 1.
pub fn ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a ratio between 0 and 1 (e.g. 0.01)")),
    }
}

/// A listen or connect address flag: `IP:PORT`, with a message that says so.
pub fn socket_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    s.parse().map_err(|_| "expected IP:PORT such as 127.0.0.1:7700 or [::]:7700 (not a host name)".to_string())
}

/// Parses a flag's duration: `500ms`, `10s`, `5m`, `1h30m` (humantime
/// syntax). The error says what a valid value looks like.
pub fn parse_duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

/// [`parse_duration`] for clap's `value_parser`: the message names valid values.
pub fn duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| format!("{e}; use a duration such as 500ms, 10s, 5m or 1h"))
}

/// Serializes a duration as a flag takes it (`10m`, `1h 30m`): for the
/// effective config the programs log and show (`#[serde(serialize_with = ...)]`).
pub fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

/// Resolves at the first SIGTERM or SIGINT: when a daemon starts draining.
/// (Never, if the handlers cannot be installed: the process is then ended
/// by SIGKILL, as it would be without them.)
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Seconds since the Unix epoch (0 if the clock is set before it).
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

#[cfg(test)]
mod helper_tests {
    #[test]
    fn durations_hex_and_clock() {
        assert_eq!(super::parse_duration("1h30m").unwrap(), std::time::Duration::from_secs(5400));
        let e = super::duration_arg("ten").unwrap_err();
        assert!(e.contains("use a duration such as"), "{e}");
        assert_eq!(super::hex(&[0, 0xab, 0x10]), "00ab10");
        assert!(super::unix_now() > 1_700_000_000);
    }

    #[test]
    fn counts_take_the_noun_in_their_number() {
        assert_eq!(super::plural(1, "proxy", "proxies"), "1 proxy");
        assert_eq!(super::plural(0u64, "proxy", "proxies"), "0 proxies");
        assert_eq!(super::plural(2usize, "proxy", "proxies"), "2 proxies");
        assert_eq!(super::plural(11, "request", "requests"), "11 requests");
        assert_eq!(super::plural(1.5, "second", "seconds"), "1.5 seconds");
    }

    #[test]
    fn durations_serialize_as_flags_take_them() {
        #[derive(serde::Serialize)]
        struct C {
            #[serde(serialize_with = "super::ser_duration")]
            d: std::time::Duration,
        }
        let json = serde_json::to_string(&C { d: std::time::Duration::from_secs(5400) }).unwrap();
        assert_eq!(json, r#"{"d":"1h 30m"}"#);
        assert_eq!(super::parse_duration("1h 30m").unwrap(), std::time::Duration::from_secs(5400));
    }
}
