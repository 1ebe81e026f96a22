//! The reference task: a small model that the demo's miners really train and that the
//! validator's built-in evaluator scores against, so that "usefulness" means something
//! without PyTorch.
//!
//! The task is linear regression from a hidden teacher: `y = A·x + 0.01·ε`, with `A`
//! (`d_out × d_in`) and every sample drawn from a deterministic generator. Each miner gets
//! its own data stream (its *slice*); the validator's evaluation batch for a window comes
//! from a stream no miner uses. Everything is f32 in a fixed order, so every process that
//! computes a loss or a training step gets the same bits.

use crate::format::codec::{
    CodecParams, InDtype, IndexEncoding, ModelSpec, ScaleMode, TensorSpec, ValueFormat,
};

mod evaluator;
pub use evaluator::ReferenceEvaluator;

/// The one tensor of the reference model.
pub const TENSOR: &str = "linear.weight";
/// The seed the demo and the built-in evaluator agree on by default.
pub const DEFAULT_SEED: u64 = 0xA11CE;

/// The codec the demo runs the reference task with: C = 1024 (the model has 4096
/// parameters), k = 48 (4.7 %), 4-bit values. Copy-detection thresholds are calibrated on it.
pub fn codec_params() -> CodecParams {
    CodecParams {
        chunk: 1024,
        k: 48,
        values: ValueFormat::Int4,
        scales: ScaleMode::Chunk,
        indices: IndexEncoding::Compact,
    }
}

/// xorshift64 with a sum of three uniforms: a cheap bell-shaped, deterministic sample.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // splitmix64 so that nearby seeds give unrelated streams (and never zero).
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let u = |s: u64| ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
        (u(self.0) + u(self.0.rotate_left(21)) + u(self.0.rotate_left(42))) * 2.0
    }
}

/// One `(x, y)` pair.
pub type Sample = (Vec<f32>, Vec<f32>);

/// The reference task: dimensions and the hidden teacher.
#[derive(Clone, Debug)]
pub struct LinearTask {
    /// Inputs of the linear map.
    pub d_in: usize,
    /// Outputs of the linear map.
    pub d_out: usize,
    seed: u64,
    teacher: Vec<f32>,
}

impl LinearTask {
    /// A task whose true map and data come from `seed`, so every peer builds the same one.
    pub fn new(seed: u64, d_in: usize, d_out: usize) -> LinearTask {
        let mut r = Rng::new(seed);
        let teacher = (0..d_in * d_out).map(|_| r.next()).collect();
        LinearTask {
            d_in,
            d_out,
            seed,
            teacher,
        }
    }

    /// The demo's size: 128 → 32 (4096 parameters).
    pub fn standard() -> LinearTask {
        LinearTask::new(DEFAULT_SEED, 128, 32)
    }

    /// The run's model: the one weight tensor.
    pub fn model_spec(&self) -> ModelSpec {
        ModelSpec {
            tensors: vec![TensorSpec {
                name: TENSOR.into(),
                shape: vec![self.d_out as u64, self.d_in as u64],
                dtype: InDtype::F32,
            }],
        }
    }

    /// Whether a run's model is this task's model (the built-in evaluator refuses others).
    pub fn matches(&self, model: &ModelSpec) -> bool {
        model.tensors.len() == 1
            && model.tensors[0].name == TENSOR
            && model.tensors[0].shape == [self.d_out as u64, self.d_in as u64]
    }

    /// The starting parameters, before window 0.
    pub fn init(&self) -> Vec<f32> {
        vec![0f32; self.d_in * self.d_out]
    }

    fn sample(&self, r: &mut Rng) -> Sample {
        let x: Vec<f32> = (0..self.d_in).map(|_| r.next()).collect();
        let y = (0..self.d_out)
            .map(|o| self.predict_one(&self.teacher, &x, o) + 0.01 * r.next())
            .collect();
        (x, y)
    }

    fn predict_one(&self, w: &[f32], x: &[f32], o: usize) -> f32 {
        w[o * self.d_in..(o + 1) * self.d_in]
            .iter()
            .zip(x)
            .map(|(a, b)| a * b)
            .sum()
    }

    /// `n` samples of stream `stream` (miners use their slice and the window).
    pub fn batch(&self, stream: u64, n: usize) -> Vec<Sample> {
        let mut r = Rng::new(self.seed ^ stream.wrapping_mul(0xD6E8_FEB8_6659_FD93));
        (0..n).map(|_| self.sample(&mut r)).collect()
    }

    /// The validator's evaluation batch for window `w`: a stream no miner trains on.
    pub(crate) fn eval_batch(&self, w: u64) -> Vec<Sample> {
        self.batch(u64::MAX - 2 * w, 64)
    }

    /// A fixed held-out set for reporting progress.
    pub fn held_out(&self) -> Vec<Sample> {
        self.batch(u64::MAX - 1, 256)
    }

    /// Mean squared error summed over outputs, averaged over samples.
    pub fn loss(&self, w: &[f32], batch: &[Sample]) -> f64 {
        let mut s = 0f64;
        for (x, y) in batch {
            for (o, yo) in y.iter().enumerate() {
                s += ((self.predict_one(w, x, o) - yo) as f64).powi(2);
            }
        }
        s / batch.len().max(1) as f64
    }

    /// `steps` SGD steps (batches of 8, learning rate 0.02) on miner `slice`'s data for
    /// window `window`.
    pub fn train(&self, w: &mut [f32], slice: u64, window: u64, steps: usize) {
        let stream = (slice + 1) << 32 ^ (window + 1);
        let data = self.batch(stream, 8 * steps);
        let lr = 0.02f32;
        for batch in data.chunks(8) {
            let mut g = vec![0f32; w.len()];
            for (x, y) in batch {
                for (o, yo) in y.iter().enumerate() {
                    let e = 2.0 * (self.predict_one(w, x, o) - yo) / batch.len() as f32;
                    for (gi, xi) in g[o * self.d_in..(o + 1) * self.d_in].iter_mut().zip(x) {
                        *gi += e * xi;
                    }
                }
            }
            for (wi, gi) in w.iter_mut().zip(&g) {
                *wi -= lr * gi;
            }
        }
    }

    /// The pseudo-gradient a miner publishes: θ_start − θ_end after local training.
    pub fn pseudo_gradient(
        &self,
        theta: &[f32],
        slice: u64,
        window: u64,
        steps: usize,
    ) -> Vec<f32> {
        let mut local = theta.to_vec();
        self.train(&mut local, slice, window, steps);
        theta.iter().zip(&local).map(|(s, e)| s - e).collect()
    }

    /// Parameters (or an update) as a one-tensor safetensors file.
    pub fn to_safetensors(&self, w: &[f32]) -> Result<Vec<u8>, safetensors::SafeTensorError> {
        let raw: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            vec![self.d_out, self.d_in],
            &raw,
        )?;
        safetensors::serialize(vec![(TENSOR, view)], None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_lowers_the_held_out_loss() {
        let t = LinearTask::standard();
        let mut w = t.init();
        let before = t.loss(&w, &t.held_out());
        for window in 0..3 {
            t.train(&mut w, 0, window, 20);
        }
        let after = t.loss(&w, &t.held_out());
        assert!(after < before * 0.7, "{before} -> {after}");
    }

    #[test]
    fn streams_differ_and_repeat() {
        let t = LinearTask::standard();
        assert_eq!(t.batch(3, 4), t.batch(3, 4));
        assert_ne!(t.batch(3, 4), t.batch(4, 4));
        assert_ne!(t.eval_batch(0), t.eval_batch(1));
        assert!(t.matches(&t.model_spec()));
        assert!(!LinearTask::new(1, 8, 4).matches(&t.model_spec()));
    }
}
