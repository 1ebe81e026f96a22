//! `shardrop`: a thin command-line layer over the `shardrop` library.
//!
//! Every command prints a human summary, or with `--json` one JSON document on stdout.
//! Errors go to stderr as one line naming the object and the reason. Exit codes: 0 success,
//! 1 error, 2 usage, 3 the object was verified and rejected.

mod bench;
mod cmd;
mod out;

/// Aggregation and decoding allocate and free buffers of hundreds of MiB from many threads;
/// glibc returns them to the kernel each time (page faults and TLB shootdowns that cost
/// more than the work). mimalloc keeps and reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use clap::{Args, Parser};
use shardrop::store::S3Options;

#[derive(Parser)]
#[command(
    name = "shardrop",
    version,
    about = "Exchange signed gradients and checkpoints through object storage only"
)]
struct Cli {
    /// Print one JSON document on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Log lines on stderr (level: SHARDROP_LOG, default warn): `auto` is text on a
    /// terminal and JSON lines otherwise.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "auto",
        env = "SHARDROP_LOG_FORMAT"
    )]
    log_format: out::LogFormat,
    #[command(flatten)]
    s3: S3Args,
    #[command(subcommand)]
    command: cmd::Command,
}

/// S3 connection settings; each falls back to the usual AWS_* variable.
#[derive(Args, Clone, Debug)]
#[command(next_help_heading = "S3 store")]
pub struct S3Args {
    /// S3-compatible endpoint (R2, MinIO, a local server) [env: AWS_ENDPOINT_URL]
    #[arg(long, global = true)]
    endpoint: Option<String>,
    /// Region [env: AWS_REGION; default us-east-1]
    #[arg(long, global = true)]
    region: Option<String>,
    /// Access key id [env: AWS_ACCESS_KEY_ID]
    #[arg(long, global = true)]
    access_key_id: Option<String>,
    /// File holding the secret access key (refused if group or others can read it); a
    /// file rather than a flag so the secret never shows in a process list. Without it, the
    /// secret itself (not a path) comes from AWS_SECRET_ACCESS_KEY
    #[arg(long, global = true)]
    secret_access_key_file: Option<std::path::PathBuf>,
    /// Allow plain HTTP (implied by an http:// endpoint) [env: AWS_ALLOW_HTTP]
    #[arg(long, global = true)]
    allow_http: bool,
    /// Per-request timeout in seconds
    #[arg(long, global = true, default_value_t = 60)]
    timeout_secs: u64,
    /// Retries of transient store errors (5xx, 429, resets), with exponential backoff
    #[arg(long, global = true, default_value_t = 8)]
    retries: usize,
}

impl S3Args {
    pub fn options(&self) -> anyhow::Result<S3Options> {
        let secret_access_key = match &self.secret_access_key_file {
            None => None,
            Some(path) => Some(read_secret(path)?),
        };
        Ok(S3Options {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            access_key_id: self.access_key_id.clone(),
            secret_access_key,
            allow_http: self.allow_http.then_some(true),
            timeout: Some(std::time::Duration::from_secs(self.timeout_secs)),
            max_retries: Some(self.retries),
        })
    }
}

/// Reads a secret from a file that only its owner can read.
fn read_secret(path: &std::path::Path) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    // The path is never echoed: a secret pasted here by mistake must not reach a terminal
    // or a log.
    let meta = std::fs::metadata(path).map_err(|e| {
        anyhow::anyhow!(
            "--secret-access-key-file: cannot read that file ({}); the path is not shown",
            e.kind()
        )
    })?;
    if !meta.is_file() {
        anyhow::bail!("--secret-access-key-file: not a plain file; the path is not shown");
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "--secret-access-key-file: the file is readable by group or others (mode {mode:o}); chmod 600 it"
        );
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        anyhow::anyhow!(
            "--secret-access-key-file: cannot read that file ({})",
            e.kind()
        )
    })?;
    Ok(text.trim().to_string())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return out::report_parse_error(&e),
    };
    out::init_logging(cli.log_format);
    let s3 = match cli.s3.options() {
        Ok(s3) => s3,
        Err(e) => {
            eprintln!("shardrop: error: {e:#}");
            return ExitCode::from(1);
        }
    };
    let ctx = cmd::Ctx { json: cli.json, s3 };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("shardrop: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let hint = cli.command.interrupted_hint();
    // Ctrl-C ends the command with a line saying what was kept and how to go on, and the
    // shell's 130 (128 + SIGINT).
    let result = runtime.block_on(async {
        tokio::select! {
            r = cmd::run(&ctx, cli.command) => Some(r),
            _ = tokio::signal::ctrl_c() => None,
        }
    });
    match result {
        Some(Ok(())) => ExitCode::SUCCESS,
        Some(Err(e)) => out::report_error(&ctx, &e),
        None => {
            out::report_interrupted(&ctx, &hint);
            // At once: dropping the runtime would wait for blocking work still running (an
            // encode would finish and write after "interrupted"). Locks and temporary files
            // left behind are harmless: the next run takes them over.
            std::process::exit(130)
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every flag and argument of every command says what it is for (`--help` is the first
    /// place a newcomer looks).
    #[test]
    fn every_argument_of_every_command_has_help() {
        fn walk(c: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in c.get_arguments() {
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} {}", a.get_id()));
                }
            }
            for s in c.get_subcommands() {
                walk(s, &format!("{path} {}", s.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(
            &<super::Cli as clap::CommandFactory>::command(),
            "shardrop",
            &mut missing,
        );
        assert!(missing.is_empty(), "no help: {missing:#?}");
    }
}
