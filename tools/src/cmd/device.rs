//! `--device cpu|cuda|cuda:N`: which codec runs. A GPU that cannot be used (a build without
//! the `cuda` feature, no driver, no NVRTC, no such device) is never fatal: the command says
//! why on stderr, records it in its report, and runs the CPU codec, whose bytes are the same.

use shardrop::format::codec::{EfState, EncodeOptions, EncodedUpdate, encode_update};
use shardrop::round::RoundError;

/// The codec a command will run.
pub enum Codec {
    Cpu,
    #[cfg(feature = "cuda")]
    Gpu(shardrop::format::codec::gpu::Gpu),
}

/// What `--device` resolved to.
pub struct Chosen {
    pub codec: Codec,
    /// "cpu", or the GPU's description.
    pub used: String,
    /// Why the GPU asked for is not used.
    pub fallback: Option<String>,
}

/// Ordinal of `cuda` / `cuda:N`; `None` for `cpu`.
fn parse(spec: &str) -> anyhow::Result<Option<usize>> {
    match spec {
        "cpu" => Ok(None),
        "cuda" => Ok(Some(0)),
        _ => match spec.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(Some(n)),
            _ => Err(crate::out::usage(format!(
                "--device {spec:?}: expected cpu, cuda or cuda:N"
            ))),
        },
    }
}

#[cfg(feature = "cuda")]
fn open(ordinal: usize) -> Result<Chosen, String> {
    match shardrop::format::codec::gpu::Gpu::open(ordinal) {
        Ok(g) => Ok(Chosen {
            used: g.describe(),
            codec: Codec::Gpu(g),
            fallback: None,
        }),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(not(feature = "cuda"))]
fn open(_ordinal: usize) -> Result<Chosen, String> {
    Err(
        "this shardrop was built without the cuda feature (cargo build --release --features cuda)"
            .into(),
    )
}

/// Resolves `--device`; see the module doc for the fallback.
pub fn choose(spec: &str) -> anyhow::Result<Chosen> {
    let Some(ordinal) = parse(spec)? else {
        return Ok(Chosen {
            codec: Codec::Cpu,
            used: "cpu".into(),
            fallback: None,
        });
    };
    Ok(open(ordinal).unwrap_or_else(|why| {
        eprintln!("shardrop: warning: --device {spec}: {why}; using the CPU codec (same bytes)");
        Chosen {
            codec: Codec::Cpu,
            used: "cpu".into(),
            fallback: Some(why),
        }
    }))
}

impl Chosen {
    /// `codec::encode_update` on the chosen device.
    pub fn encode_update(
        &self,
        bytes: &[u8],
        state: &mut EfState,
        opts: &EncodeOptions,
    ) -> Result<EncodedUpdate, RoundError> {
        Ok(match &self.codec {
            Codec::Cpu => encode_update(bytes, state, opts)?,
            #[cfg(feature = "cuda")]
            Codec::Gpu(g) => g.encode_update(bytes, state, opts)?,
        })
    }

    /// Where an aggregator's merge runs.
    pub fn aggregate_options(self) -> shardrop::round::aggregate::AggregateOptions {
        match self.codec {
            Codec::Cpu => shardrop::round::aggregate::AggregateOptions::default(),
            #[cfg(feature = "cuda")]
            Codec::Gpu(g) => shardrop::round::aggregate::AggregateOptions {
                gpu: Some(std::sync::Arc::new(g)),
                ..Default::default()
            },
        }
    }

    /// Report fields: the device used and, when it is not the one asked for, why.
    pub fn report(&self) -> serde_json::Value {
        serde_json::json!({"device": self.used, "device_fallback": self.fallback})
    }
}
