//! The run and its participants: one signed object, the trust root of a run.
//!
//! The registry names the run's clock (genesis, window length, grace), the model (tensor
//! names, shapes, dtypes), the codec every miner must use, and every participant: its role,
//! its public key (peer id) and where its store is. It is signed by the run's **operator**
//! key and lives at `runs/<run>/registry` in the operator's store; only the operator may
//! change it, by compare-and-swap on the object's ETag so that two edits never lose one.
//! Credentials are never written into it: a participant entry says where the *reader's*
//! credentials for that store come from (ambient `AWS_*`, or `<PREFIX>AWS_*` variables), so a
//! validator can hold read-only keys per peer bucket.

use crate::round::RoundReason;
use serde::{Deserialize, Serialize};

use crate::format::codec::{CodecParams, ModelSpec};
use crate::format::envelope::EnvelopeError;
use crate::identity::PeerId;
use crate::round::outer::{Outer, Setting};
use crate::store::{self, S3Options, StoreError, Target};

mod revise;
mod rules;
mod seen;
mod signed;

/// What a participant does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Publishes shards.
    Miner,
    /// Merges them and publishes aggregates and checkpoints.
    Aggregator,
    /// Scores the miners and publishes weights.
    Validator,
}

impl Role {
    /// The name used in registries, messages and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Role::Miner => "miner",
            Role::Aggregator => "aggregator",
            Role::Validator => "validator",
        }
    }

    /// The inverse of [`Role::name`].
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "miner" => Some(Role::Miner),
            "aggregator" => Some(Role::Aggregator),
            "validator" => Some(Role::Validator),
            _ => None,
        }
    }
}

/// Where a reader finds credentials for a participant's store.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "from")]
pub enum Credentials {
    /// The reader's own `AWS_*` environment (or none, for local folders).
    #[default]
    Ambient,
    /// `<prefix>AWS_ACCESS_KEY_ID`, `<prefix>AWS_SECRET_ACCESS_KEY` and optionally
    /// `<prefix>AWS_ENDPOINT_URL` / `<prefix>AWS_REGION`.
    EnvPrefix {
        /// Prepended to each variable name (`MINER3_`, say).
        prefix: String,
    },
}

/// One peer of the run: who it is, what it does, and where readers find what it writes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Participant {
    /// What it does.
    pub role: Role,
    /// Its peer id (the public key that signs what it writes).
    pub peer: String,
    /// Store URL (bucket + prefix) the participant writes to.
    pub store: String,
    /// How readers get credentials for its store.
    #[serde(default)]
    pub credentials: Credentials,
}

/// Per-run limits every reader applies to what participants publish.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunLimits {
    /// Largest gradient object accepted, bytes.
    pub max_grad_bytes: u64,
    /// Outlier rule: a shard whose L2 norm exceeds this many times the median norm of the
    /// window's accepted shards is scaled down to it (with at least 3 shards).
    pub clip_norm_ratio: f64,
}

impl Default for RunLimits {
    fn default() -> Self {
        RunLimits {
            max_grad_bytes: 4 << 30,
            clip_norm_ratio: 3.0,
        }
    }
}

/// Aggregate formats (`round.md`, "Aggregate").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AggFormat {
    /// One signed object with the merged tensors (U32 index + F32 value, or dense F32).
    #[default]
    #[serde(rename = "agg-v1")]
    V1,
    /// A signed verdict naming the accepted shards; readers merge them (`round.md`).
    #[serde(rename = "agg-v2")]
    V2,
}

/// Where an agg-v2 reader finds what it merges. A run names one of these; each window's
/// list names the form that window used (`Auto` picks `Shards` or `Merged` per window).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AggForm {
    /// Per window, whichever of `Shards` and `Merged` is smaller: the shards while few peers
    /// are accepted, the merged tensor once their union is denser than their sum.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    /// Byte-for-byte copies of the accepted shards in the aggregator's store: readers need
    /// only its credentials, and catch-up survives miners deleting old shards.
    #[serde(rename = "shards")]
    Shards,
    /// The merged tensor (agg-v1's lossless tensor sections) in one object in the
    /// aggregator's store, beside the list of the shards it merges.
    #[serde(rename = "merged")]
    Merged,
    /// The miners' own objects, read with the credentials the registry names: no copy, but
    /// a reader fails (naming the section) once a miner deletes or replaces its shard.
    #[serde(rename = "reference")]
    Reference,
}

impl AggForm {
    /// The name the registry and the aggregate's header use.
    pub fn name(self) -> &'static str {
        match self {
            AggForm::Auto => "auto",
            AggForm::Shards => "shards",
            AggForm::Merged => "merged",
            AggForm::Reference => "reference",
        }
    }

    /// The form named `s`.
    pub fn parse(s: &str) -> Option<AggForm> {
        [
            AggForm::Auto,
            AggForm::Shards,
            AggForm::Merged,
            AggForm::Reference,
        ]
        .into_iter()
        .find(|f| f.name() == s)
    }

    /// Whether a window's list may use `used` in a run of this form.
    pub fn allows(self, used: AggForm) -> bool {
        match self {
            AggForm::Auto => matches!(used, AggForm::Shards | AggForm::Merged),
            run => used == run,
        }
    }

    /// Whether the aggregator copies the shards into its store.
    pub fn consolidated(self) -> bool {
        self != AggForm::Reference
    }
}

/// The run's aggregate format and, for agg-v2, its form.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateSpec {
    /// The format.
    pub format: AggFormat,
    /// Where the sections live (agg-v2 only).
    #[serde(default)]
    pub form: AggForm,
}

impl AggregateSpec {
    /// agg-v2 with the given form (what new runs get).
    pub fn v2(form: AggForm) -> Self {
        AggregateSpec {
            format: AggFormat::V2,
            form,
        }
    }

    /// An agg-v1 run (registries without the field).
    pub(crate) fn is_v1(&self) -> bool {
        self.format == AggFormat::V1
    }
}

/// The section size of runs whose registry does not name one.
pub(crate) const DEFAULT_SECTION_BYTES: u64 = 16 << 20;

/// The longest window or grace a reader accepts, seconds (136 years: every time in ms
/// stays far inside u64).
pub(crate) const MAX_SECS: u64 = 1 << 32;

/// The most elements a model tensor may have (the codec's own limit, 2^36, is lower).
pub(crate) const MAX_TENSOR_ELEMENTS: u64 = 1 << 40;

/// The largest section size a reader accepts (a section is decompressed whole).
pub(crate) const MAX_SECTION_BYTES: u64 = 1 << 30;

fn default_section_bytes() -> u64 {
    DEFAULT_SECTION_BYTES
}

fn is_default_section_bytes(v: &u64) -> bool {
    *v == DEFAULT_SECTION_BYTES
}

/// The registry document (JSON inside the signed envelope).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// The registry format (1).
    pub format: u32,
    /// The run id every object of the run names in its signed header.
    pub run: String,
    /// The operator's peer id: only its signature makes a revision valid.
    pub operator: String,
    /// Incremented by every update (compare-and-swap on the object).
    pub revision: u64,
    /// When window 0 starts, by the store's clock, ms since the epoch.
    pub genesis_ms: u64,
    /// Window length.
    pub window_secs: u64,
    /// How long after a window's deadline shards still count.
    pub grace_secs: u64,
    /// The model's tensors (names, shapes, dtypes): what every decoder checks against.
    pub model: ModelSpec,
    /// The codec every shard must use.
    pub codec: CodecParams,
    /// The payload bytes after which an encoder closes a section (`gradient.md` §8,
    /// "Sections"). Part of the content rule: readers refuse a shard packed otherwise
    /// (`section_layout`), so one update has one section table and one content hash.
    /// Absent (the default, 16 MiB) in registries made before it was written down.
    #[serde(
        default = "default_section_bytes",
        skip_serializing_if = "is_default_section_bytes"
    )]
    pub section_bytes: u64,
    /// Error-feedback decay every miner uses before the first entry of `settings` (every
    /// window, in runs made before settings existed).
    #[serde(deserialize_with = "crate::numbers::f32_text")]
    pub beta: f32,
    /// Outer learning rate of plain SGD (θ ← θ − outer_lr · aggregate) before the first
    /// entry of `settings`.
    #[serde(deserialize_with = "crate::numbers::f32_text")]
    pub outer_lr: f32,
    /// Size and clipping limits of the run.
    pub limits: RunLimits,
    /// The aggregate format the run's aggregator writes and its readers expect. Absent in
    /// registries made before agg-v2 existed: they are agg-v1 runs, and stay byte-identical
    /// when re-signed.
    #[serde(default, skip_serializing_if = "AggregateSpec::is_v1")]
    pub aggregate: AggregateSpec,
    /// The outer optimizer and error-feedback decay in force from each listed window on,
    /// ascending (`round.md`, "Settings"). Absent in registries made before settings
    /// existed: those runs use plain SGD at `outer_lr` and `beta` throughout.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub settings: Vec<Setting>,
    /// Every peer of the run.
    pub participants: Vec<Participant>,
}

/// Who acts, in which run, with which store settings: what every publish, merge, validation
/// and checkpoint push takes, instead of the same three arguments each time.
#[derive(Clone, Copy)]
pub struct Job<'a> {
    /// The run, verified.
    pub reg: &'a Registry,
    /// The key the job signs with; it must be registered in the role the job acts in.
    pub id: &'a crate::identity::Identity,
    /// Settings for opening stores (the registry's credential entries apply on top).
    pub s3: &'a S3Options,
}

impl<'a> Job<'a> {
    /// A job of `id` in `reg`'s run.
    pub fn new(reg: &'a Registry, id: &'a crate::identity::Identity, s3: &'a S3Options) -> Self {
        Job { reg, id, s3 }
    }

    /// The store the job writes to in `role`, after checking it is registered so.
    pub fn own_store(&self, role: Role) -> Result<Target, RegistryError> {
        self.reg.own_store(self.id, role, self.s3)
    }
}

/// Why a registry could not be read, changed or used.
// Each variant's fields are the parts of its message (`#[error]`), documented there.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{object}: {reason}")]
    Invalid { object: String, reason: String },
    /// No registry at the URL: the detail says what is there instead (the runs the store
    /// holds, or that it cannot be listed), so a wrong run name or bucket is found at once.
    #[error("{object}: {detail}")]
    NotFound { object: String, detail: String },
    /// A registry read from a store breaks a reader rule (`round.md`, "Reader rules"):
    /// refused whole, so nothing is published or applied under it.
    #[error("{object}: {detail} ({reason}); the operator must publish a valid revision")]
    Rejected {
        object: String,
        reason: RoundReason,
        detail: String,
    },
    /// The edit cannot be made, for a reason with a stable code (`window_not_future`).
    #[error("{object}: {detail}")]
    Refused {
        object: String,
        reason: RoundReason,
        detail: String,
    },
    /// The caller's key is not in the registry in the role it acts in.
    #[error("{peer} is not registered as role {} in run {run}", .role.name())]
    NotRegistered {
        peer: PeerId,
        role: Role,
        run: String,
    },
}

impl crate::error::Classified for RegistryError {
    fn class(&self) -> crate::error::ErrorClass {
        match self {
            RegistryError::Envelope(e) => e.class(),
            RegistryError::Store(e) => e.class(),
            RegistryError::Invalid { .. } => crate::error::ErrorClass::Caller,
            RegistryError::NotFound { .. } => crate::error::ErrorClass::NotFound,
            RegistryError::Rejected { .. } => crate::error::ErrorClass::Rejected,
            RegistryError::Refused { .. } | RegistryError::NotRegistered { .. } => {
                crate::error::ErrorClass::Refused
            }
        }
    }

    fn reason(&self) -> Option<&'static str> {
        match self {
            RegistryError::Envelope(e) => e.reason(),
            RegistryError::Refused { reason, .. } | RegistryError::Rejected { reason, .. } => {
                Some(reason.code())
            }
            RegistryError::NotRegistered { .. } => Some(RoundReason::NotRegistered.code()),
            _ => None,
        }
    }

    fn object(&self) -> Option<&str> {
        match self {
            RegistryError::Envelope(e) => e.object(),
            RegistryError::Store(e) => e.object(),
            RegistryError::Invalid { object, .. }
            | RegistryError::NotFound { object, .. }
            | RegistryError::Refused { object, .. }
            | RegistryError::Rejected { object, .. } => Some(object),
            RegistryError::NotRegistered { .. } => None,
        }
    }
}

const SECTION: &str = "registry.json";

impl Participant {
    /// A participant whose store readers open with their own ambient credentials.
    pub fn new(role: Role, peer: &PeerId, store: String) -> Participant {
        Participant {
            role,
            peer: peer.to_string(),
            store,
            credentials: Credentials::Ambient,
        }
    }
}

impl Registry {
    /// A first revision with no participants; plain SGD at rate 1, `beta` 0.9 from window 0
    /// (one entry in `settings`) and default limits, which callers may change before
    /// `create`.
    pub fn new(
        run: &str,
        operator: &PeerId,
        genesis_ms: u64,
        window_secs: u64,
        grace_secs: u64,
        model: ModelSpec,
        codec: CodecParams,
    ) -> Registry {
        Registry {
            format: 1,
            run: run.to_string(),
            operator: operator.to_string(),
            revision: 1,
            genesis_ms,
            window_secs,
            grace_secs,
            model,
            codec,
            section_bytes: DEFAULT_SECTION_BYTES,
            beta: 0.9,
            outer_lr: 1.0,
            limits: RunLimits::default(),
            aggregate: AggregateSpec::v2(AggForm::Auto),
            settings: vec![Setting {
                from_window: 0,
                outer: Outer::sgd(1.0),
                beta: 0.9,
            }],
            participants: Vec::new(),
        }
    }

    /// The setting in force for window `w`: the last entry of `settings` that starts at or
    /// before it, or the run's original plain SGD at `outer_lr` with `beta`.
    pub fn setting_at(&self, w: u64) -> Setting {
        self.settings
            .iter()
            .rev()
            .find(|s| s.from_window <= w)
            .copied()
            .unwrap_or(Setting {
                from_window: 0,
                outer: Outer::sgd(self.outer_lr),
                beta: self.beta,
            })
    }

    /// The section names an honest shard of this run has, in order: the model packed by
    /// the codec's exact payload sizes, a section closed once it reaches `section_bytes`
    /// (`gradient.md` §8, "Sections").
    pub fn section_names(&self) -> Vec<String> {
        crate::format::codec::section_ranges(&self.model, &self.codec, self.section_bytes as usize)
            .into_iter()
            .map(|r| crate::format::codec::section_name(r.start, r.end - 1))
            .collect()
    }

    /// Whether any window before `w` is applied with a momentum optimizer: then the
    /// parameters after window `w − 1` are not the whole state, and a replay from there
    /// needs the momentum buffers too.
    pub fn momentum_before(&self, w: u64) -> bool {
        // Windows before the first entry use plain SGD, which keeps no state.
        self.settings
            .iter()
            .any(|s| s.from_window < w && s.outer.optimizer.keeps_momentum())
    }

    /// The participant with this peer id in this role, if registered so.
    pub fn participant(&self, peer: &PeerId, role: Role) -> Option<&Participant> {
        let id = peer.to_string();
        self.participants
            .iter()
            .find(|p| p.peer == id && p.role == role)
    }

    /// Participants of a role, ordered by peer id (the deterministic merge order).
    pub fn with_role(&self, role: Role) -> Vec<&Participant> {
        let mut v: Vec<&Participant> = self
            .participants
            .iter()
            .filter(|p| p.role == role)
            .collect();
        v.sort_by(|a, b| a.peer.cmp(&b.peer));
        v
    }

    /// The run's aggregator (the first registered one) and its store: where every peer reads
    /// aggregates, ledgers and checkpoints from.
    pub fn aggregator(&self, s3: &S3Options) -> Result<(PeerId, Target), RegistryError> {
        let bad = |reason: String| RegistryError::Invalid {
            object: format!("run {}", self.run),
            reason,
        };
        let agg = self
            .with_role(Role::Aggregator)
            .first()
            .copied()
            .ok_or_else(|| bad("the registry names no aggregator".into()))?;
        let id = PeerId::parse(&agg.peer).map_err(|e| bad(e.to_string()))?;
        Ok((id, self.open_store(agg, s3)?))
    }

    /// The store `id` writes to in `role`, after checking it is registered so.
    pub fn own_store(
        &self,
        id: &crate::identity::Identity,
        role: Role,
        s3: &S3Options,
    ) -> Result<Target, RegistryError> {
        let peer = id.peer_id();
        let entry = self
            .participant(&peer, role)
            .ok_or_else(|| RegistryError::NotRegistered {
                peer,
                role,
                run: self.run.clone(),
            })?;
        Ok(self.open_store(entry, s3)?)
    }

    /// Opens a participant's store with the credentials the registry names for it.
    pub fn open_store(&self, p: &Participant, base: &S3Options) -> Result<Target, StoreError> {
        let mut opts = base.clone();
        if let Credentials::EnvPrefix { prefix } = &p.credentials {
            let var = |name: &str| std::env::var(format!("{prefix}{name}")).ok();
            if var("AWS_ACCESS_KEY_ID").is_none() && var("AWS_SECRET_ACCESS_KEY").is_none() {
                warn_unset_prefix(prefix, &p.store);
            }
            opts.access_key_id = var("AWS_ACCESS_KEY_ID").or(opts.access_key_id);
            opts.secret_access_key = var("AWS_SECRET_ACCESS_KEY").or(opts.secret_access_key);
            opts.endpoint = var("AWS_ENDPOINT_URL").or(opts.endpoint);
            opts.region = var("AWS_REGION").or(opts.region);
        }
        store::open(&p.store, &opts)
    }
}

/// Says once per prefix that a participant's named credentials are not set here, so its
/// store is read with this machine's own (which may well be refused: a 403 then names the
/// cause a reader can fix).
fn warn_unset_prefix(prefix: &str, store: &str) {
    static WARNED: std::sync::Mutex<std::collections::BTreeSet<String>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    if let Ok(mut w) = WARNED.lock()
        && w.insert(prefix.to_string())
    {
        tracing::warn!(
            store,
            "{prefix}AWS_ACCESS_KEY_ID and {prefix}AWS_SECRET_ACCESS_KEY are not set: reading {store} with this machine's own AWS_* credentials (set them to the read-only credentials its owner gave for it)"
        );
    }
}

/// A registry failure in a round job keeps its class and code: `not_registered` is a
/// refusal (exit 3) in every command, like any rule of the run, and a registry that breaks
/// a reader rule stays a rejection with its code.
impl From<RegistryError> for super::RoundError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Store(s) => super::RoundError::Store(s),
            RegistryError::Envelope(s) => super::RoundError::Envelope(s),
            RegistryError::Refused { reason, .. } => super::RoundError::Refused {
                reason,
                detail: e.to_string(),
            },
            other @ RegistryError::NotRegistered { .. } => super::RoundError::Refused {
                reason: RoundReason::NotRegistered,
                detail: other.to_string(),
            },
            RegistryError::Rejected {
                object,
                reason,
                detail,
            } => super::RoundError::Rejected {
                object,
                reason: reason.code(),
                detail: format!("{detail} ({reason}); the operator must publish a valid revision"),
            },
            other @ RegistryError::Invalid { .. } => super::RoundError::Caller(other.to_string()),
            RegistryError::NotFound { object, detail } => {
                super::RoundError::Missing { object, detail }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::round::outer::OptimizerKind;

    fn nesterov(from: u64, lr: f32) -> Setting {
        Setting {
            from_window: from,
            outer: Outer {
                optimizer: OptimizerKind::Nesterov,
                lr,
                momentum: 0.9,
                schedule: Default::default(),
            },
            beta: 0.8,
        }
    }

    #[test]
    fn settings_apply_from_their_window_and_only_future_windows_change() {
        let op = Identity::generate();
        // Windows of 10 s from t = 0; "now" is inside window 2.
        let mut reg = run_of(&op);
        reg.settings.clear();
        reg.outer_lr = 0.5;
        // A registry from before settings: plain SGD at outer_lr everywhere.
        assert_eq!(reg.setting_at(7).outer, Outer::sgd(0.5));
        assert!(!reg.momentum_before(100));
        let now = 25_000;
        let e = reg.set_from(nesterov(2, 0.7), now).unwrap_err();
        assert!(
            matches!(
                e,
                RegistryError::Refused {
                    reason: RoundReason::WindowNotFuture,
                    ..
                }
            ),
            "{e}"
        );
        reg.set_from(nesterov(4, 0.7), now).unwrap();
        // The original setting was made explicit, so the history reads from window 0.
        assert_eq!(reg.settings.len(), 2);
        assert_eq!(reg.setting_at(3).outer, Outer::sgd(0.5));
        assert_eq!(reg.setting_at(4).outer.lr, 0.7);
        assert_eq!(reg.setting_at(4).beta, 0.8);
        assert!(!reg.momentum_before(4));
        assert!(reg.momentum_before(5));
        reg.set_from(nesterov(9, 0.35), now).unwrap();
        // A later change to a window before 9 replaces the never-applied entry.
        reg.set_from(nesterov(6, 0.1), now).unwrap();
        let firsts: Vec<u64> = reg.settings.iter().map(|s| s.from_window).collect();
        assert_eq!(firsts, [0, 4, 6]);
        assert_eq!(reg.setting_at(100).outer.lr, 0.1);
        reg.validate("registry").unwrap();
        // Out of order, or a bad setting, is an invalid registry.
        reg.settings.swap(1, 2);
        assert!(reg.validate("registry").is_err());
        reg.settings.swap(1, 2);
        reg.settings[2].outer.momentum = 1.5;
        assert!(reg.validate("registry").is_err());
    }

    /// Run "r" of `op`: windows of 10 s from t = 0, grace 5 s, an empty model.
    fn run_of(op: &Identity) -> Registry {
        Registry::new(
            "r",
            &op.peer_id(),
            0,
            10,
            5,
            Default::default(),
            Default::default(),
        )
    }

    /// A reason code, from a refusal of `validate` or `load`.
    fn reason_of(e: &RegistryError) -> &'static str {
        crate::error::Classified::reason(e).unwrap_or("none")
    }

    #[test]
    fn reader_rules_refuse_a_registry_by_name_with_a_reason() {
        let op = Identity::generate();
        let good = run_of(&op);
        good.validate("registry").unwrap();
        type Edit = Box<dyn Fn(&mut Registry)>;
        let cases: Vec<(&str, Edit)> = vec![
            (
                "settings_invalid",
                Box::new(|r| r.settings[0].outer.lr = 1e30),
            ),
            (
                "settings_invalid",
                Box::new(|r| r.settings[0].outer.lr = -0.5),
            ),
            (
                "settings_invalid",
                Box::new(|r| r.settings[0].outer.schedule.warmup = 1 << 60),
            ),
            (
                "settings_invalid",
                Box::new(|r| {
                    r.settings[0].outer.schedule.kind = crate::round::outer::ScheduleKind::Cosine;
                    r.settings[0].outer.schedule.decay = 0;
                }),
            ),
            (
                "settings_invalid",
                Box::new(|r| r.settings[0].outer.momentum = 0.5),
            ),
            ("settings_invalid", Box::new(|r| r.settings[0].beta = 1.5)),
            (
                "settings_invalid",
                Box::new(|r| r.settings[0].outer.schedule.final_ratio = 2.0),
            ),
            (
                "settings_invalid",
                Box::new(|r| r.settings[0].outer.schedule.origin = Some(3)),
            ),
            ("settings_invalid", Box::new(|r| r.outer_lr = f32::INFINITY)),
            ("registry_invalid", Box::new(|r| r.section_bytes = 0)),
            (
                "registry_invalid",
                Box::new(|r| r.limits.clip_norm_ratio = 0.5),
            ),
            ("registry_invalid", Box::new(|r| r.window_secs = 0)),
        ];
        for (want, edit) in &cases {
            let mut r = good.clone();
            edit(&mut r);
            let e = r.validate("s3://b/runs/r/registry").unwrap_err();
            assert_eq!(reason_of(&e), *want, "{e}");
            assert!(e.to_string().contains("s3://b/runs/r/registry"), "{e}");
            assert_eq!(
                crate::error::Classified::class(&e),
                crate::error::ErrorClass::Rejected
            );
        }
    }

    #[tokio::test]
    async fn readers_refuse_an_old_revision_put_back_and_a_rewritten_past() {
        use object_store::ObjectStoreExt;
        let op = Identity::generate();
        let s3 = S3Options::default();
        let base = format!("memory://reg-history-{}", op.peer_id());
        let target = store::open(&base, &s3).unwrap();
        let now = chrono::Utc::now().timestamp_millis() as u64;
        // Windows of 60 s; window 10 is open now.
        let reg = Registry::new(
            "h",
            &op.peer_id(),
            now - 630_000,
            60,
            10,
            Default::default(),
            Default::default(),
        );
        let url = reg.create(&target, &op).await.unwrap();
        let path = target.path(&crate::format::layout::registry("h"));
        let rev1 = target
            .store
            .get(&path)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        Registry::load(&url, &s3, None).await.unwrap();
        let miner = Identity::generate().peer_id();
        Registry::revise(&url, &s3, &op, |r| {
            r.participants
                .push(Participant::new(Role::Miner, &miner, format!("{base}/m")));
            Ok(())
        })
        .await
        .unwrap();
        let rev2 = target
            .store
            .get(&path)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(Registry::load(&url, &s3, None).await.unwrap().0.revision, 2);
        // The older, validly signed revision put back: the miner added later would vanish.
        target.store.put(&path, rev1.into()).await.unwrap();
        let e = Registry::load(&url, &s3, None).await.unwrap_err();
        assert_eq!(reason_of(&e), "registry_rollback", "{e}");
        // An operator-signed revision 3 that changes the setting of window 0 (long open).
        target.store.put(&path, rev2.into()).await.unwrap();
        let (mut r, _) = Registry::load(&url, &s3, None).await.unwrap();
        r.revision = 3;
        r.settings[0].outer.lr = 0.5;
        target
            .store
            .put(&path, r.sign(&op).unwrap().into())
            .await
            .unwrap();
        let e = Registry::load(&url, &s3, None).await.unwrap_err();
        assert_eq!(reason_of(&e), "settings_rewritten", "{e}");
        // A change from a future window is an ordinary revision.
        r.settings[0].outer.lr = 1.0;
        r.settings.push(Setting {
            from_window: 20,
            outer: Outer::sgd(0.5),
            beta: 0.9,
        });
        target
            .store
            .put(&path, r.sign(&op).unwrap().into())
            .await
            .unwrap();
        assert_eq!(Registry::load(&url, &s3, None).await.unwrap().0.revision, 3);
        // `run set` keeps a margin: the next window opens within 5 s of "now" here.
        let mut m = r.clone();
        let opens = m.genesis_ms + 11 * 60_000;
        let e = m.set_from(nesterov(11, 0.7), opens - 3_000).unwrap_err();
        assert_eq!(reason_of(&e), "window_not_future", "{e}");
        assert_eq!(m.next_settable(opens - 3_000), 12);
        m.set_from(nesterov(11, 0.7), opens - 6_000).unwrap();
    }

    #[test]
    fn registry_numbers_are_read_with_one_rounding_to_f32() {
        let op = Identity::generate();
        let reg = run_of(&op);
        let mut json = serde_json::to_value(&reg).unwrap();
        // The decimal just above the midpoint of 1 and the next f32: through f64 it would
        // tie to even (1.0); read once it is the next f32 up.
        let text = "1.0000000596046447753906250000001";
        json["settings"][0]["outer"]["lr"] = serde_json::Value::Null;
        let doc = serde_json::to_string(&json)
            .unwrap()
            .replace("\"lr\":null", &format!("\"lr\":{text}"));
        let back: Registry = serde_json::from_str(&doc).unwrap();
        assert_eq!(
            back.settings[0].outer.lr,
            f32::from_bits(1.0f32.to_bits() + 1)
        );
        // The default section size is not written, so older registries keep their bytes.
        assert!(
            !serde_json::to_string(&reg)
                .unwrap()
                .contains("section_bytes")
        );
    }
}
