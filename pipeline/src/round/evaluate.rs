//! Usefulness: the loss on an evaluation batch before and after applying one miner's update.
//!
//! The validator does not know the model's framework, so the measurement is behind the
//! [`Evaluator`] trait. Two implementations:
//! - `refmodel::ReferenceEvaluator`: the built-in reference task, the model the demo
//!   trains; it rebuilds θ_w by replaying the run's aggregates.
//! - [`CommandEvaluator`]: runs a user command (a PyTorch validator, say) per miner with the
//!   decoded update as safetensors and reads `{"loss_before": .., "loss_after": ..}` from the
//!   last line of its standard output, under a timeout.
//!
//! An evaluator's failure is never the miner's fault: the validator records it and carries the
//! miner's rating over unchanged.

use std::time::Duration;

use crate::format::codec::{Dense, dense_to_safetensors};
use crate::round::registry::Registry;
use crate::store::S3Options;

/// Loss on the evaluation batch with θ_w, and with θ_w − scale · update.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Losses {
    /// Loss on the window's evaluation batch with θ_w.
    pub loss_before: f64,
    /// Loss on the same batch after the miner's scaled update.
    pub loss_after: f64,
}

/// Why an evaluator could not measure: recorded as text in the score table's `eval_error`,
/// and never the miner's fault (its rating carries over).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum EvalError {
    /// The evaluator cannot measure this run (its model is another one).
    #[error("{0}")]
    Unsupported(String),
    /// θ_w could not be rebuilt (an aggregate missing or refused).
    #[error("{0}")]
    Model(String),
    /// The measurement failed: the update is not what the evaluator expects, or the
    /// command failed, timed out or printed no losses.
    #[error("{0}")]
    Failed(String),
    /// The miner's shard could not be read again as it was checked (changed, gone, or not
    /// served within the window's budget): the miner's doing, not the evaluator's, so it
    /// scores 0 and never stops a validator from publishing.
    #[error("{0}")]
    Shard(String),
}

impl EvalError {
    /// Whether the evaluator (the validator's side) failed, rather than the miner's shard.
    pub fn is_evaluator(&self) -> bool {
        !matches!(self, EvalError::Shard(_))
    }
}

/// Measures how much one miner's update helps.
#[async_trait::async_trait]
pub trait Evaluator: Send {
    /// Recorded in the signed weights object, so readers know what the scores mean.
    fn name(&self) -> String;

    /// Called once per window before any miner: bring the model to θ_w (after the aggregates
    /// of windows `..w`). An error here is recorded for every miner of the window.
    async fn prepare(&mut self, reg: &Registry, s3: &S3Options, w: u64) -> Result<(), EvalError>;

    /// `scale` is the step this update contributes to the aggregate: `outer_lr / n` for `n`
    /// eligible miners. A whole step of one miner's noisy update overshoots where the mean of
    /// `n` does not, so the marginal step is what says whether the update helps.
    async fn evaluate(
        &mut self,
        reg: &Registry,
        w: u64,
        peer: &str,
        update: &Dense,
        scale: f32,
    ) -> Result<Losses, EvalError>;
}

/// Runs `sh -c 'CMD "$@"' shardrop-eval --update FILE --window W --peer PEER --run RUN
/// --scale S` once per miner (documented in `schemas/scores.md`).
pub struct CommandEvaluator {
    cmd: String,
    timeout: Duration,
    dir: tempfile::TempDir,
}

impl CommandEvaluator {
    /// An evaluator running `cmd` per miner, killed after `timeout`; updates go to a private temporary folder.
    pub fn new(cmd: &str, timeout: Duration) -> std::io::Result<CommandEvaluator> {
        Ok(CommandEvaluator {
            cmd: cmd.to_string(),
            timeout,
            dir: tempfile::Builder::new()
                .prefix("shardrop-eval-")
                .tempdir()?,
        })
    }
}

fn failed(detail: String) -> EvalError {
    EvalError::Failed(detail)
}

/// The last line of the output that parses as the losses object.
fn parse_losses(stdout: &str) -> Result<Losses, EvalError> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .ok_or_else(|| failed("the command printed nothing".into()))?;
    let l: Losses = serde_json::from_str(line.trim()).map_err(|e| {
        failed(format!(
            "the last output line is not {{\"loss_before\":..,\"loss_after\":..}}: {e}"
        ))
    })?;
    if !l.loss_before.is_finite() || !l.loss_after.is_finite() {
        return Err(failed("the command reported a non-finite loss".into()));
    }
    Ok(l)
}

fn tail(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim();
    let cut = s.len().saturating_sub(300);
    let start = (cut..=s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    s[start..].to_string()
}

#[async_trait::async_trait]
impl Evaluator for CommandEvaluator {
    fn name(&self) -> String {
        format!("command: {}", self.cmd)
    }

    async fn prepare(&mut self, _: &Registry, _: &S3Options, _: u64) -> Result<(), EvalError> {
        Ok(())
    }

    async fn evaluate(
        &mut self,
        reg: &Registry,
        w: u64,
        peer: &str,
        update: &Dense,
        scale: f32,
    ) -> Result<Losses, EvalError> {
        self.run(reg, w, peer, update, scale).await
    }
}

impl CommandEvaluator {
    /// One run of the command; the error is the text the score table records.
    async fn run(
        &mut self,
        reg: &Registry,
        w: u64,
        peer: &str,
        update: &Dense,
        scale: f32,
    ) -> Result<Losses, EvalError> {
        let file = self
            .dir
            .path()
            .join(format!("update-{w}-{peer}.safetensors"));
        let bytes = dense_to_safetensors(update).map_err(|e| failed(e.to_string()))?;
        std::fs::write(&file, bytes)
            .map_err(|e| failed(format!("cannot write {}: {e}", file.display())))?;
        let child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{} \"$@\"", self.cmd))
            .arg("shardrop-eval")
            .arg("--update")
            .arg(&file)
            .args([
                "--window",
                &w.to_string(),
                "--peer",
                peer,
                "--run",
                &reg.run,
                "--scale",
                &scale.to_string(),
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| failed(format!("cannot start sh: {e}")));
        let result = match child {
            Err(e) => Err(e),
            Ok(child) => match tokio::time::timeout(self.timeout, child.wait_with_output()).await {
                Err(_) => Err(failed(format!(
                    "timed out after {:.0} s",
                    self.timeout.as_secs_f64()
                ))),
                Ok(Err(e)) => Err(failed(format!("waiting for the command: {e}"))),
                Ok(Ok(out)) if !out.status.success() => Err(failed(format!(
                    "exited with {}: {}",
                    out.status,
                    tail(&out.stderr)
                ))),
                Ok(Ok(out)) => parse_losses(&String::from_utf8_lossy(&out.stdout)),
            },
        };
        let _ = std::fs::remove_file(&file);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losses_come_from_the_last_line() {
        let l =
            parse_losses("warming up\n{\"loss_before\": 2.5, \"loss_after\": 2.0}\n\n").unwrap();
        assert_eq!((l.loss_before, l.loss_after), (2.5, 2.0));
        assert!(parse_losses("").is_err());
        assert!(parse_losses("{\"loss_before\": 1}").is_err());
        assert!(parse_losses("{\"loss_before\": 1, \"loss_after\": \"x\"}").is_err());
        assert!(tail("é".repeat(400).as_bytes()).chars().count() <= 300);
    }
}
