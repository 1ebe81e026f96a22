//! The outer optimizer: how each window's aggregate moves the parameters every peer holds.
//!
//! Every peer applies the same aggregate with the same settings, in f32, in the operation
//! order written here and in `round.md` ("Outer optimizer"): that is what keeps every
//! replica's parameters bit-identical, so nothing here may be fused, reordered or
//! vectorised across elements in a way that changes a rounding. Settings (optimizer,
//! learning rate, schedule, error-feedback decay) are part of the signed registry and may
//! change from a future window on; each window is applied with the setting in force for it.
//!
//! Momentum kinds keep one f32 buffer per parameter: at 72 B parameters that is 288 GB in
//! all, 36 GB per rank of an 8-GPU miner, the same as the parameters themselves (DiLoCo's
//! outer Nesterov has the same cost). Checkpoints carry it (`MOMENTUM_PREFIX`) so a late
//! joiner replays exactly.

use std::collections::BTreeMap;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// The update rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// θ ← θ − lr·a (SparseLoCo, Templar).
    Sgd,
    /// Heavy ball: m ← μ·m + a; θ ← θ − lr·m (PyTorch SGD, momentum, no dampening).
    Momentum,
    /// m ← μ·m + a; θ ← θ − lr·(a + μ·m) (PyTorch SGD `nesterov=True`; DiLoCo's outer step).
    Nesterov,
}

impl OptimizerKind {
    /// The name registries and the CLI use.
    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::Sgd => "sgd",
            OptimizerKind::Momentum => "momentum",
            OptimizerKind::Nesterov => "nesterov",
        }
    }

    /// The inverse of [`OptimizerKind::name`].
    pub fn parse(s: &str) -> Option<Self> {
        [
            OptimizerKind::Sgd,
            OptimizerKind::Momentum,
            OptimizerKind::Nesterov,
        ]
        .into_iter()
        .find(|k| k.name() == s)
    }

    /// Whether applying a window reads and writes a momentum buffer.
    pub fn keeps_momentum(self) -> bool {
        self != OptimizerKind::Sgd
    }
}

/// The shape of the learning rate over windows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// The base rate (after any warm-up).
    #[default]
    Constant,
    /// Linear from the base rate to `final_ratio` of it over `decay` windows.
    Linear,
    /// Half a cosine from the base rate to `final_ratio` of it over `decay` windows.
    Cosine,
}

impl ScheduleKind {
    /// The name registries and the CLI use.
    pub fn name(self) -> &'static str {
        match self {
            ScheduleKind::Constant => "constant",
            ScheduleKind::Linear => "linear",
            ScheduleKind::Cosine => "cosine",
        }
    }

    /// The inverse of [`ScheduleKind::name`].
    pub fn parse(s: &str) -> Option<Self> {
        [
            ScheduleKind::Constant,
            ScheduleKind::Linear,
            ScheduleKind::Cosine,
        ]
        .into_iter()
        .find(|k| k.name() == s)
    }
}

/// A learning-rate schedule in windows, counted from `origin` (default: the window the
/// setting takes effect). Windows, not steps, because a window is what every peer agrees on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Its shape after warm-up.
    pub kind: ScheduleKind,
    /// Windows of linear warm-up: window t < warmup uses (t+1)/warmup of the rate.
    #[serde(default)]
    pub warmup: u64,
    /// Windows of decay after the warm-up (linear and cosine).
    #[serde(default)]
    pub decay: u64,
    /// The rate at the end of the decay, as a fraction of the base rate.
    #[serde(default, deserialize_with = "crate::numbers::f32_text")]
    pub final_ratio: f32,
    /// The window that counts as t = 0; before or at the setting's first window, so a
    /// revision can keep a schedule that began earlier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<u64>,
}

/// The largest base learning rate a reader accepts: far above any useful outer rate
/// (DiLoCo's is 0.7, Templar's 1), low enough that a registry cannot hold `1e30`.
pub(crate) const MAX_LR: f32 = 1000.0;

/// The most windows a warm-up or decay may span (about 190 years of 23-minute windows):
/// every window count then converts to f64 exactly and `t + 1` cannot overflow.
pub(crate) const MAX_WINDOWS: u64 = 1 << 32;

/// The outer optimizer of a setting.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outer {
    /// The rule.
    pub optimizer: OptimizerKind,
    /// Base learning rate.
    #[serde(deserialize_with = "crate::numbers::f32_text")]
    pub lr: f32,
    /// μ, for the momentum kinds (0 for SGD).
    #[serde(default, deserialize_with = "crate::numbers::f32_text")]
    pub momentum: f32,
    /// How the rate moves over windows.
    #[serde(default)]
    pub schedule: Schedule,
}

impl Outer {
    /// Plain SGD at a constant rate: what every run had before settings existed.
    pub fn sgd(lr: f32) -> Self {
        Outer {
            optimizer: OptimizerKind::Sgd,
            lr,
            momentum: 0.0,
            schedule: Schedule::default(),
        }
    }
}

/// What is in force from one window on: the outer optimizer and the miners' error-feedback
/// decay. A registry lists them in ascending `from_window`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Setting {
    /// The first window it applies to.
    pub from_window: u64,
    /// The outer optimizer.
    pub outer: Outer,
    /// Error-feedback decay miners use (not verifiable by readers: a miner's own business,
    /// published so that honest miners agree).
    #[serde(deserialize_with = "crate::numbers::f32_text")]
    pub beta: f32,
}

/// A change of the outer setting (`run set`, `run init`): the fields given, each `None`
/// kept from the setting in force. Its defaults are the spec's (`round.md`, "Settings"), in
/// this one place for every face.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SettingChange {
    /// The rule (kept when `None`).
    pub optimizer: Option<OptimizerKind>,
    /// The learning rate.
    pub lr: Option<f32>,
    /// The momentum; `None` keeps the old one where both rules keep momentum, else 0.9 for
    /// a rule that keeps it and 0 for one that does not.
    pub momentum: Option<f32>,
    /// The schedule's shape.
    pub schedule: Option<ScheduleKind>,
    /// Warm-up windows.
    pub warmup: Option<u64>,
    /// Decay windows.
    pub decay: Option<u64>,
    /// The final rate as a fraction of `lr`.
    pub final_ratio: Option<f32>,
    /// The window the schedule counts from; `None` carries the old origin over when the
    /// shape is unchanged (a changed shape starts afresh at `from_window`).
    pub origin: Option<u64>,
    /// The error-feedback decay.
    pub beta: Option<f32>,
}

impl SettingChange {
    /// `base` (the setting in force) with this change applied, from `from_window` on.
    pub fn over(&self, base: &Setting, from_window: u64) -> Setting {
        let optimizer = self.optimizer.unwrap_or(base.outer.optimizer);
        let momentum = match (self.momentum, optimizer.keeps_momentum()) {
            (Some(m), _) => m,
            (None, false) => 0.0,
            (None, true) if base.outer.optimizer.keeps_momentum() => base.outer.momentum,
            (None, true) => 0.9,
        };
        let b = base.outer.schedule;
        let reshaped = self.schedule.is_some()
            || self.warmup.is_some()
            || self.decay.is_some()
            || self.final_ratio.is_some();
        let carried = (b.warmup > 0 || b.kind != ScheduleKind::Constant).then(|| base.origin());
        let origin = match (self.origin, reshaped) {
            (Some(o), _) => Some(o),
            (None, true) => None,
            (None, false) => carried,
        }
        .filter(|&o| o != from_window);
        Setting {
            from_window,
            outer: Outer {
                optimizer,
                lr: self.lr.unwrap_or(base.outer.lr),
                momentum,
                schedule: Schedule {
                    kind: self.schedule.unwrap_or(b.kind),
                    warmup: self.warmup.unwrap_or(b.warmup),
                    decay: self.decay.unwrap_or(b.decay),
                    final_ratio: self.final_ratio.unwrap_or(b.final_ratio),
                    origin,
                },
            },
            beta: self.beta.unwrap_or(base.beta),
        }
    }
}

impl Setting {
    /// The window the schedule counts from.
    pub fn origin(&self) -> u64 {
        self.outer.schedule.origin.unwrap_or(self.from_window)
    }

    /// The learning rate of window `w`, computed in f64 and rounded once to f32, each f64
    /// operation in the order written (`round.md`, "Outer optimizer"). The cosine is
    /// [`cos_pi`], a stated polynomial any language reproduces bit for bit.
    pub fn lr_at(&self, w: u64) -> f32 {
        let s = &self.outer.schedule;
        let t = w.saturating_sub(self.origin());
        let base = f64::from(self.outer.lr);
        let factor = if t < s.warmup {
            (t + 1) as f64 / s.warmup as f64
        } else {
            let after = t - s.warmup;
            let r = f64::from(s.final_ratio);
            let done = if s.decay == 0 {
                0.0
            } else {
                after.min(s.decay) as f64 / s.decay as f64
            };
            match s.kind {
                ScheduleKind::Constant => 1.0,
                ScheduleKind::Linear => r + (1.0 - r) * (1.0 - done),
                ScheduleKind::Cosine => r + (1.0 - r) * 0.5 * (1.0 + cos_pi(done)),
            }
        };
        (base * factor) as f32
    }

    /// Why this setting cannot be used, if it cannot.
    pub fn problem(&self) -> Option<String> {
        let o = &self.outer;
        let s = &o.schedule;
        if !(o.lr.is_finite() && (0.0..=MAX_LR).contains(&o.lr)) {
            return Some(format!("learning rate {} is not in [0, {MAX_LR}]", o.lr));
        }
        if s.warmup > MAX_WINDOWS || s.decay > MAX_WINDOWS {
            return Some(format!(
                "warm-up {} or decay {} windows is over {MAX_WINDOWS}",
                s.warmup, s.decay
            ));
        }
        if !(0.0..1.0).contains(&o.momentum) {
            return Some(format!("momentum {} is not in [0, 1)", o.momentum));
        }
        if o.optimizer == OptimizerKind::Sgd && o.momentum != 0.0 {
            return Some("sgd takes no momentum (use momentum or nesterov)".into());
        }
        if !(0.0..=1.0).contains(&s.final_ratio) {
            return Some(format!("final_ratio {} is not in [0, 1]", s.final_ratio));
        }
        if s.kind != ScheduleKind::Constant && s.decay == 0 {
            return Some(format!(
                "a {} schedule needs decay > 0 windows",
                s.kind.name()
            ));
        }
        if s.origin.is_some_and(|o| o > self.from_window) {
            return Some("the schedule's origin is after the setting's first window".into());
        }
        if !(0.0..=1.0).contains(&self.beta) {
            return Some(format!("beta {} is not in [0, 1]", self.beta));
        }
        None
    }

    /// One line for people: `nesterov lr 0.7 μ 0.9, cosine …, beta 0.9`.
    pub fn describe(&self) -> String {
        let o = &self.outer;
        let s = &o.schedule;
        let mut text = format!("{} lr {}", o.optimizer.name(), o.lr);
        if o.optimizer.keeps_momentum() {
            text += &format!(" momentum {}", o.momentum);
        }
        if s.warmup > 0 {
            text += &format!(", warm-up {} window(s)", s.warmup);
        }
        if s.kind != ScheduleKind::Constant {
            text += &format!(
                ", {} decay over {} window(s) to {}×",
                s.kind.name(),
                s.decay,
                s.final_ratio
            );
        }
        if s.warmup > 0 || s.kind != ScheduleKind::Constant {
            text += &format!(" from window {}", self.origin());
        }
        text + &format!(", beta {}", self.beta)
    }
}

/// The Taylor coefficients of cos, `(−1)^k / (2k)!` for k = 0..=10, each the nearest f64
/// (as bit patterns, so no decimal conversion stands between the spec and the value).
pub const COS_COEFFS: [u64; 11] = [
    0x3ff0000000000000, // 1
    0xbfe0000000000000, // -1/2
    0x3fa5555555555555, // 1/24
    0xbf56c16c16c16c17, // -1/720
    0x3efa01a01a01a01a,
    0xbe927e4fb7789f5c,
    0x3e21eed8eff8d898,
    0xbda93974a8c07c9d,
    0x3d2ae7f3e733b81f,
    0xbca6827863b97d97,
    0x3c1e542ba4020225, // 1/20!
];

/// cos(π·s) for s in [0, 1], as `round.md` states it, so that another language gets the
/// same bits (a libm's `cos` differs between libraries in the last bit): fold to
/// x = s (s ≤ 0.5) or x = 1 − s with the sign flipped (exact), y = π·x with π the f64
/// nearest it, z = y·y, then Horner over [`COS_COEFFS`] from the highest (c = C10;
/// c = c·z + Ck down to k = 0), every operation one f64 rounding, never fused. Within
/// 4.5e-16 (two units in the last place near 1) of libm's cosine on [0, 1]; the truncated
/// Taylor term is below 2e-17.
pub fn cos_pi(s: f64) -> f64 {
    let (x, sign) = match s <= 0.5 {
        true => (s, 1.0),
        false => (1.0 - s, -1.0),
    };
    let y = std::f64::consts::PI * x;
    let z = y * y;
    let mut c = f64::from_bits(COS_COEFFS[10]);
    for &k in COS_COEFFS[..10].iter().rev() {
        c = c * z + f64::from_bits(k);
    }
    sign * c
}

/// Momentum buffers, by tensor name; a tensor with no buffer has an all-zero one. Saved
/// beside the parameters (and in checkpoints) as f32 tensors named `MOMENTUM_PREFIX + name`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OuterState {
    /// One buffer per parameter tensor, the tensor's length.
    pub momentum: BTreeMap<String, Vec<f32>>,
}

/// Prefix of the momentum tensors in state files and checkpoints.
pub const MOMENTUM_PREFIX: &str = "outer_momentum.";

impl OuterState {
    /// Moves every `MOMENTUM_PREFIX` tensor out of `dense` (a pulled checkpoint folder holds
    /// both) into a state.
    pub fn take_from(dense: &mut crate::format::codec::Dense) -> OuterState {
        let names: Vec<String> = dense
            .keys()
            .filter(|k| k.starts_with(MOMENTUM_PREFIX))
            .cloned()
            .collect();
        let mut state = OuterState::default();
        for n in names {
            if let Some((_, v)) = dense.remove(&n) {
                state
                    .momentum
                    .insert(n[MOMENTUM_PREFIX.len()..].to_string(), v);
            }
        }
        state
    }

    /// The buffers as prefixed tensors with the parameters' shapes.
    pub(crate) fn to_dense(
        &self,
        shapes: &BTreeMap<String, Vec<u64>>,
    ) -> crate::format::codec::Dense {
        self.momentum
            .iter()
            .filter_map(|(n, v)| {
                let shape = shapes.get(n)?.clone();
                Some((format!("{MOMENTUM_PREFIX}{n}"), (shape, v.clone())))
            })
            .collect()
    }
}

/// The `format` a state file's safetensors metadata names.
pub(crate) const STATE_FORMAT: &str = "shardrop-outer-state-v1";

/// A state file: the momentum buffers after window `after` (`None`: before window 0) of
/// `run`, as safetensors (f32 tensors `MOMENTUM_PREFIX + name`; metadata `format`, `run`,
/// `after`), so a later replay can tell a stale file from the right one.
pub fn state_to_safetensors(
    state: &OuterState,
    shapes: &BTreeMap<String, Vec<u64>>,
    run: &str,
    after: Option<u64>,
) -> Result<Vec<u8>, crate::format::codec::CodecError> {
    let meta: std::collections::HashMap<String, String> = [
        ("format".to_string(), STATE_FORMAT.to_string()),
        ("run".to_string(), run.to_string()),
        (
            "after".to_string(),
            after.map_or("genesis".into(), |w| w.to_string()),
        ),
    ]
    .into();
    crate::format::codec::dense_to_safetensors_with(&state.to_dense(shapes), Some(meta))
}

/// Reads a state file: the state, its run and the window it is after (`None`: genesis).
pub(crate) fn state_from_safetensors(
    bytes: &[u8],
) -> Result<(OuterState, String, Option<u64>), crate::format::codec::CodecError> {
    let bad = |d: String| crate::format::codec::CodecError::Malformed(d);
    let (_, header) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(STATE_FORMAT) {
        return Err(bad(format!(
            "not a {STATE_FORMAT} file (its metadata names no such format)"
        )));
    }
    let run = meta.get("run").cloned().unwrap_or_default();
    let after = match meta.get("after").map(String::as_str) {
        Some("genesis") => None,
        Some(w) => Some(
            w.parse()
                .map_err(|_| bad(format!("after {w:?} is not a window")))?,
        ),
        None => return Err(bad("no `after` window in its metadata".into())),
    };
    let mut dense = crate::format::codec::dense_from_safetensors(bytes)?;
    let state = OuterState::take_from(&mut dense);
    if let Some(other) = dense.keys().next() {
        return Err(bad(format!("tensor {other:?} is not a momentum buffer")));
    }
    Ok((state, run, after))
}

/// Elements per parallel task: large enough that rayon's overhead vanishes, small enough
/// that a 72 B model's tensors spread over every core.
const PAR: usize = 1 << 16;

/// Applies one window's merged aggregate `a` of one tensor to `theta` (and `m`, for the
/// momentum kinds) with rate `lr`. Per element, each operation rounded to f32, never fused:
///
/// - sgd: `θ ← θ − (lr·a)`, skipped where `a == 0` (θ − lr·(+0) = θ: agg-v1's sparse form
///   skips them, and both forms must give the same bits);
/// - momentum: `m ← (μ·m) + a; θ ← θ − (lr·m)`;
/// - nesterov: `m ← (μ·m) + a; θ ← θ − (lr·(a + (μ·m)))`.
///
/// Elements are independent, so the parallel split changes no bit.
pub fn step(outer: &Outer, lr: f32, theta: &mut [f32], a: &[f32], m: &mut [f32]) {
    let mu = outer.momentum;
    match outer.optimizer {
        OptimizerKind::Sgd => {
            theta
                .par_chunks_mut(PAR)
                .zip(a.par_chunks(PAR))
                .for_each(|(t, a)| {
                    for (t, &x) in t.iter_mut().zip(a) {
                        if x != 0.0 {
                            let d = lr * x;
                            *t -= d;
                        }
                    }
                })
        }
        OptimizerKind::Momentum | OptimizerKind::Nesterov => {
            let nesterov = outer.optimizer == OptimizerKind::Nesterov;
            theta
                .par_chunks_mut(PAR)
                .zip(a.par_chunks(PAR))
                .zip(m.par_chunks_mut(PAR))
                .for_each(|((t, a), m)| {
                    for ((t, &x), m) in t.iter_mut().zip(a).zip(m) {
                        let decayed = mu * *m;
                        *m = decayed + x;
                        let g = match nesterov {
                            true => {
                                let look = mu * *m;
                                x + look
                            }
                            false => *m,
                        };
                        let d = lr * g;
                        *t -= d;
                    }
                })
        }
    }
}

pub(crate) mod state_file;
pub use state_file::{StateFile, read_state_file};

#[cfg(test)]
mod tests;
