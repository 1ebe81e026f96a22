//! The validator's commands: `validate` and `scores show|history`.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use shardrop::format::tables::ScoreRow;
use shardrop::identity::PeerId;
use shardrop::refmodel::LinearTask;
use shardrop::refmodel::ReferenceEvaluator;
use shardrop::round::evaluate::{CommandEvaluator, Evaluator};
use shardrop::round::registry::{Job, Participant, Registry, Role};
use shardrop::round::score::{
    OnEvalError, ValidateOptions, read_scored_window, scored_windows, validate_window,
};

use super::Ctx;
use crate::out;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnEvalErrorArg {
    /// Publish nothing for the window (exit 3, `eval_failed`).
    Refuse,
    /// Publish, carrying the failed miners' ratings and weights over.
    Carry,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EvaluatorKind {
    /// `command` when --eval-cmd is given, `reference` when the run's model is the reference
    /// model, else `none`.
    Auto,
    /// The built-in reference task (the demo's model).
    Reference,
    /// --eval-cmd, once per miner.
    Command,
    /// No loss measurement: the score is the agreement.
    None,
}

#[derive(Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    job: super::round::JobArgs,
    /// How usefulness is measured: `auto` (--eval-cmd when given, the built-in reference
    /// model when the run's model is it, else none), `command` (--eval-cmd), `reference`
    /// (the demo's model), or `none` (the score is the agreement alone).
    #[arg(long, value_enum, default_value = "auto")]
    evaluator: EvaluatorKind,
    /// Run once per eligible miner as `sh -c 'CMD "$@"' shardrop-eval --update FILE
    /// --window W --peer P --run R --scale S`: FILE is the miner's decoded update (safetensors,
    /// dense f32, the model's names and shapes), S the step it contributes to the aggregate
    /// (outer lr / eligible miners). The last line of its output must be {"loss_before": X,
    /// "loss_after": Y}: the loss on its own batch at θ_W and at θ_W − S·update. A non-zero
    /// exit, a timeout or another line is an evaluator error (see --on-eval-error). A tested
    /// example: tools/python/tests/eval_norm.py.
    #[arg(long)]
    eval_cmd: Option<String>,
    /// What an evaluator error for an eligible miner does: `refuse` publishes nothing for the
    /// window (exit 3, `eval_failed`, naming each miner and error; fix the evaluator and
    /// rerun), `carry` publishes with that miner's rating and weight carried over from its
    /// previous table. Never the miner's fault either way.
    #[arg(long, value_enum, default_value = "refuse")]
    on_eval_error: OnEvalErrorArg,
    /// Seconds one run of --eval-cmd may take before it counts as an evaluator error.
    #[arg(long, default_value_t = 120)]
    eval_timeout_secs: u64,
    /// Seed of the reference task (the demo's by default).
    #[arg(long, default_value_t = shardrop::refmodel::DEFAULT_SEED)]
    reference_seed: u64,
    /// Rating update weight: rating ← (1 − α)·rating + α·score.
    #[arg(long, default_value_t = 0.25)]
    alpha: f64,
    /// Past aggregates each miner is compared with for copying.
    #[arg(long, default_value_t = 2)]
    copy_lookback: u64,
}

#[derive(Subcommand)]
pub enum ScoresCommand {
    /// Print a validator's verified score table for a window (or the last N).
    Show(ShowArgs),
    /// One miner across windows.
    History(HistoryArgs),
}

#[derive(Args)]
pub struct Which {
    /// The run's registry URL.
    registry: String,
    /// The validator (peer id) when the run has several.
    #[arg(long)]
    validator: Option<String>,
}

#[derive(Args)]
pub struct ShowArgs {
    #[command(flatten)]
    which: Which,
    /// One scored window (default: the newest).
    #[arg(long, conflicts_with = "last")]
    window: Option<u64>,
    /// The last N scored windows (default 1).
    #[arg(long)]
    last: Option<usize>,
}

#[derive(Args)]
pub struct HistoryArgs {
    #[command(flatten)]
    which: Which,
    /// The miner's peer id.
    #[arg(long)]
    peer: String,
    /// Only the last N scored windows.
    #[arg(long)]
    last: Option<usize>,
}

fn evaluator(a: &ValidateArgs, reg: &Registry) -> anyhow::Result<Option<Box<dyn Evaluator>>> {
    let task = || LinearTask::new(a.reference_seed, 128, 32);
    let kind = match a.evaluator {
        EvaluatorKind::Auto if a.eval_cmd.is_some() => EvaluatorKind::Command,
        EvaluatorKind::Auto if task().matches(&reg.model) => EvaluatorKind::Reference,
        EvaluatorKind::Auto => EvaluatorKind::None,
        k => k,
    };
    Ok(match kind {
        EvaluatorKind::Reference => {
            if !task().matches(&reg.model) {
                bail!(
                    "--evaluator reference: run {} does not train the reference model; use --eval-cmd",
                    reg.run
                );
            }
            Some(Box::new(ReferenceEvaluator::new(
                task(),
                Duration::from_secs(reg.window_secs.max(5)),
            )))
        }
        EvaluatorKind::Command => {
            let cmd = a
                .eval_cmd
                .as_deref()
                .ok_or_else(|| out::usage("--evaluator command needs --eval-cmd"))?;
            Some(Box::new(CommandEvaluator::new(
                cmd,
                Duration::from_secs(a.eval_timeout_secs),
            )?))
        }
        _ => None,
    })
}

/// A peer id's first 10 hex digits (enough to tell peers apart); a name (the demo's
/// `late-joiner`) whole.
fn short(peer: &str) -> String {
    match peer.len() == 64 && peer.bytes().all(|b| b.is_ascii_hexdigit()) {
        true => peer.chars().take(10).collect(),
        false => peer.to_string(),
    }
}

fn opt(x: Option<f64>, prec: usize) -> String {
    x.map_or("-".into(), |v| format!("{v:.prec$}"))
}

/// The readable table (also used by the demo).
pub fn format_rows(rows: &[ScoreRow], with_window: bool) -> String {
    let pw = rows
        .iter()
        .map(|r| short(&r.peer).chars().count())
        .max()
        .unwrap_or(0)
        .max(10);
    let mut t = format!(
        "{}{:<pw$} {:<22} {:>7} {:>6} {:<12} {:>6} {:>10} {:>5} {:>6} {:>6}\n",
        if with_window { "window " } else { "" },
        "peer",
        "verdict",
        "s early",
        "agree",
        "nearest",
        "sim",
        "useful",
        "score",
        "rating",
        "weight"
    );
    for r in rows {
        let verdict = match (r.verdict.as_str(), r.reason.as_str(), r.copier) {
            (_, _, true) if r.verdict == "accepted" => "copier".to_string(),
            (v, "", _) => v.to_string(),
            (v, reason, _) if v == reason => v.to_string(),
            (v, reason, _) => format!("{v}:{reason}"),
        };
        t += &format!(
            "{}{:<pw$} {:<22} {:>7} {:>6} {:<12} {:>6} {:>10} {:>5} {:>6.3} {:>6.3}{}\n",
            if with_window {
                format!("{:>6} ", r.window)
            } else {
                String::new()
            },
            short(&r.peer),
            verdict,
            opt(r.secs_before_deadline, 1),
            opt(r.agreement, 2),
            r.nearest
                .as_deref()
                .map_or("-".into(), |n| if n.starts_with("agg:") {
                    n.to_string()
                } else {
                    short(n)
                }),
            opt(r.similarity, 2),
            r.usefulness.map_or("-".into(), |u| format!("{u:.3e}")),
            opt(r.score, 2),
            r.rating,
            r.weight,
            r.eval_error
                .as_deref()
                .map_or(String::new(), |e| format!("  (evaluator: {e})"))
        );
    }
    t += "(s early: seconds before the deadline the shard landed, negative within the grace after it; agree: agreement with the others; sim: similarity to the nearest; useful: loss drop)\n";
    t
}

pub async fn validate_cmd(ctx: &Ctx, a: ValidateArgs) -> anyhow::Result<()> {
    let Some((id, mut reg, mut w)) = super::round::start_job(ctx, &a.job, Role::Validator).await?
    else {
        return Ok(());
    };
    let mut ev = evaluator(&a, &reg)?;
    let opts = ValidateOptions {
        budget: a.job.budget(),
        concurrency: a.job.concurrency,
        alpha: a.alpha,
        copy_lookback: a.copy_lookback,
        on_eval_error: match a.on_eval_error {
            OnEvalErrorArg::Refuse => OnEvalError::Refuse,
            OnEvalErrorArg::Carry => OnEvalError::Carry,
        },
        ..ValidateOptions::default()
    };
    loop {
        let v = validate_window(
            Job::new(&reg, &id, &ctx.s3),
            w,
            ev.as_mut().map(|e| e.as_mut() as &mut dyn Evaluator),
            &opts,
        )
        .await?;
        let text = format!(
            "window {} scored by {} -> {}{}\n{}",
            v.window,
            v.evaluator,
            v.scores,
            if v.already_published {
                " (already published, identical)"
            } else {
                ""
            },
            format_rows(&v.rows, false)
        );
        let mut json = serde_json::to_value(&v)?;
        json["peak_rss_mib"] = out::peak_rss_mib().into();
        out::emit(ctx, &json, &text);
        let unread: Vec<String> = v
            .rows
            .iter()
            .filter(|r| r.verdict == shardrop::format::tables::Verdict::Error)
            .map(|r| format!("{}: {}", r.peer, r.detail))
            .collect();
        out::warn_unread(ctx, v.window, &unread, "scores (rated as a store error)");
        if !a.job.follow {
            return Ok(());
        }
        w += 1;
        // Participants join between windows: follow the registry too.
        reg = Registry::load(&a.job.registry, &ctx.s3, None).await?.0;
    }
}

async fn pick_validator(ctx: &Ctx, which: &Which) -> anyhow::Result<(Registry, Participant)> {
    let (reg, _) = Registry::load(&which.registry, &ctx.s3, None).await?;
    let validators = reg.with_role(Role::Validator);
    let v = match &which.validator {
        Some(p) => {
            let p = PeerId::parse(p)?;
            reg.participant(&p, Role::Validator)
                .with_context(|| format!("{p} is not a validator of run {}", reg.run))?
        }
        None => match validators.as_slice() {
            [one] => one,
            [] => bail!("run {} has no validator", reg.run),
            _ => bail!(
                "run {} has {} validators; pick one with --validator",
                reg.run,
                validators.len()
            ),
        },
    };
    let v = v.clone();
    Ok((reg, v))
}

pub async fn scores_cmd(ctx: &Ctx, c: ScoresCommand) -> anyhow::Result<()> {
    match c {
        ScoresCommand::Show(a) => {
            let (reg, v) = pick_validator(ctx, &a.which).await?;
            let windows = match a.window {
                Some(w) => vec![w],
                None => {
                    let all = scored_windows(&reg, &v, &ctx.s3).await?;
                    let n = a.last.unwrap_or(1);
                    all[all.len().saturating_sub(n)..].to_vec()
                }
            };
            if windows.is_empty() {
                bail!(
                    "validator {} has not scored any window of run {}",
                    v.peer,
                    reg.run
                );
            }
            let mut json = Vec::new();
            let mut text = String::new();
            for w in windows {
                let (rows, body) = read_scored_window(&reg, &v, &ctx.s3, w).await?;
                text += &format!(
                    "window {w} (verified: signed weights bind the table), evaluator {}\n{}\n",
                    body["evaluator"].as_str().unwrap_or("?"),
                    format_rows(&rows, false)
                );
                json.push(
                    serde_json::json!({"window": w, "evaluator": body["evaluator"], "rows": rows}),
                );
            }
            out::emit(ctx, &serde_json::Value::Array(json), text.trim_end());
        }
        ScoresCommand::History(a) => {
            let (reg, v) = pick_validator(ctx, &a.which).await?;
            let peer = PeerId::parse(&a.peer)?.to_string();
            let all = scored_windows(&reg, &v, &ctx.s3).await?;
            let n = a.last.unwrap_or(all.len());
            let mut rows = Vec::new();
            for w in &all[all.len().saturating_sub(n)..] {
                let (r, _) = read_scored_window(&reg, &v, &ctx.s3, *w).await?;
                rows.extend(r.into_iter().filter(|r| r.peer == peer));
            }
            if rows.is_empty() {
                bail!("{peer} has no row in validator {}'s tables", v.peer);
            }
            let text = format!("{peer}\n{}", format_rows(&rows, true));
            out::emit(ctx, &serde_json::to_value(&rows)?, text.trim_end());
        }
    }
    Ok(())
}
