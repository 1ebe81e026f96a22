//! Output plumbing: JSON or text, one-line errors, progress bars on a terminal and
//! structured logs otherwise.

use std::io::IsTerminal;
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};
use shardrop::error::ErrorClass;

use crate::cmd::Ctx;

/// How log lines on stderr look (`--log-format`, `SHARDROP_LOG_FORMAT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    // Text on a terminal, JSON lines otherwise (a log collector's input). (Plain comments:
    // documented variants would turn every command's --help into the long layout.)
    Auto,
    Text,
    Json,
}

/// Logs go to stderr at `SHARDROP_LOG` (default `warn`), as `format` says. Errors are never
/// log lines: each command's failure is one plain `shardrop: error:` line (and a JSON
/// document on stdout with `--json`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHARDROP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let json = match format {
        LogFormat::Auto => !std::io::stderr().is_terminal(),
        LogFormat::Text => false,
        LogFormat::Json => true,
    };
    if json {
        builder.json().init();
    } else {
        builder.compact().init();
    }
}

/// A mistake in the command line that clap cannot see (a combination of flags, the form of
/// a value): exit 2 like clap's own, with class null in the JSON document.
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// A usage error (exit 2).
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Usage(message.into()))
}

/// A command line clap refused (or `--help`/`--version`, exit 0): its message on stderr and,
/// when `--json` was among the arguments, the JSON error document on stdout; exit 2.
pub fn report_parse_error(e: &clap::Error) -> ExitCode {
    if !e.use_stderr() {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    let _ = e.print();
    if std::env::args_os().any(|a| a == "--json") {
        // The message up to clap's usage block, on one line.
        let text = e.to_string();
        let line = text
            .lines()
            .map(str::trim)
            .take_while(|l| !l.is_empty() && !l.starts_with("Usage:"))
            .collect::<Vec<_>>()
            .join(" ");
        let line = line.trim_start_matches("error: ");
        let doc = serde_json::json!({"ok": false, "error": line, "class": null, "reason": null});
        println!("{doc}");
    }
    ExitCode::from(2)
}

/// Prints the command's result.
pub fn emit(ctx: &Ctx, json: &serde_json::Value, text: &str) {
    if ctx.json {
        println!("{json}");
    } else {
        print!("{text}");
        if !text.ends_with('\n') {
            println!();
        }
    }
}

/// Says on stderr, one line per miner, that a miner's shard could not be read and was left
/// out of the window's `what` (already published: it is final), with the store's words and
/// the usual fix: a store error is often the reader's own credentials for that store. In
/// `--json` mode the document's `unread` list says the same.
pub fn warn_unread(ctx: &Ctx, window: u64, unread: &[String], what: &str) {
    if ctx.json {
        return;
    }
    for u in unread {
        eprintln!(
            "shardrop: warning: window {window}: left out of the {what}, its store could not be read: {u} (if it is this machine's access, set the credentials the registry names for that store: `shardrop run show` lists each store's <PREFIX>)"
        );
    }
}

/// Ctrl-C: one line (or the JSON error document) saying the command was interrupted, what
/// was kept and how to go on.
pub fn report_interrupted(ctx: &Ctx, hint: &str) {
    let msg = format!("interrupted: {hint}");
    if ctx.json {
        println!(
            "{}",
            serde_json::json!({"ok": false, "error": msg, "class": null, "reason": null})
        );
    }
    eprintln!("shardrop: {msg}");
}

/// An error whose JSON document the command already printed (the demo's summary with
/// `"ok": false`): `--json` output stays one document.
#[derive(Debug)]
pub struct Reported(pub String);

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Reported {}

/// A verified input refused with a stable reason code that is not an envelope's (a codec
/// reason, say): exits 3 like every rejection.
#[derive(Debug)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Refusal {}

/// The class and reason code of the first library error in the chain (the outermost one
/// that says; wrappers delegate to what they wrap), as the library classifies it.
fn classify(e: &anyhow::Error) -> Option<(ErrorClass, Option<&'static str>)> {
    e.chain().find_map(|c| {
        shardrop::classified(c)
            .map(|t| (t.class(), t.reason()))
            .or_else(|| {
                c.downcast_ref::<Refusal>()
                    .map(|r| (ErrorClass::Rejected, Some(r.reason)))
            })
    })
}

/// `v` as a JSON value through its text form, so that f32 fields read as written
/// (`0.9`, not `0.8999999761581421`: `to_value` widens f32 to f64 first).
pub fn value_of<T: serde::Serialize>(v: &T) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_slice(&serde_json::to_vec(v)?)?)
}

/// The error and its causes on one line, each cause once: an error whose message already
/// quotes its source (`path: No such file or directory`) does not repeat it.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string().replace('\n', " ");
        // A cause its wrapper already quotes at its end (`path: <source>`) is said once.
        if text.is_empty() || line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// One line on stderr; with `--json` also a JSON error document on stdout. The exit code
/// comes from the error's class: 3 when an object was verified and rejected (its reason
/// code goes into the JSON), so scripts can tell "bad object" from "could not check"; 1
/// otherwise.
pub fn report_error(ctx: &Ctx, e: &anyhow::Error) -> ExitCode {
    let line = one_line(e);
    eprintln!("shardrop: error: {line}");
    // An error the CLI raised itself (arguments, local files) has no library class.
    let (class, reason) = classify(e).map_or((None, None), |(c, r)| (Some(c), r));
    let rejection =
        reason.filter(|_| matches!(class, Some(ErrorClass::Rejected | ErrorClass::Refused)));
    if ctx.json && e.downcast_ref::<Reported>().is_none() {
        let doc = serde_json::json!({
            "ok": false,
            "error": line,
            "class": class.map(ErrorClass::name),
            "reason": rejection,
        });
        println!("{doc}");
    }
    if class.is_none() && e.chain().any(|c| c.downcast_ref::<Usage>().is_some()) {
        return ExitCode::from(2);
    }
    ExitCode::from(class.map_or(1, ErrorClass::exit_code))
}

/// A byte progress bar on a terminal (and not in JSON mode); hidden otherwise, in which case
/// the caller logs milestones with tracing.
pub fn bytes_bar(ctx: &Ctx, total: u64, what: &str) -> ProgressBar {
    if ctx.json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// This process's peak resident memory (VmHWM), MiB; 0 where /proc is unavailable. Jobs
/// report it so operators can size their containers.
pub fn peak_rss_mib() -> f64 {
    peak_rss_mib_of("self").unwrap_or(0.0)
}

/// The peak resident memory (VmHWM) of process `pid` (or `self`), MiB; `None` once it has
/// exited or where /proc is unavailable.
pub fn peak_rss_mib_of(pid: &str) -> Option<f64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
}
