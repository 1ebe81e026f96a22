//! The reader rules (`round.md`, "Reader rules"): what every reader checks before it uses a
//! registry, and every writer before it signs one.

use super::*;
use crate::identity::PeerId;
use crate::round::RoundReason;
use crate::round::outer::{Outer, Setting};

impl Registry {
    /// The reader rules (`round.md`, "Reader rules"): what every reader checks before it
    /// uses a registry, and every writer before it signs one. `registry_invalid` for the
    /// run's shape, `settings_invalid` for its settings history.
    pub(super) fn validate(&self, object: &str) -> Result<(), RegistryError> {
        let bad = |reason: RoundReason, detail: String| RegistryError::Rejected {
            object: object.to_string(),
            reason,
            detail,
        };
        let shape = |detail: String| bad(RoundReason::RegistryInvalid, detail);
        let setting = |detail: String| bad(RoundReason::SettingsInvalid, detail);
        if self.format != 1 {
            return Err(shape(format!(
                "registry format {} (this build reads 1)",
                self.format
            )));
        }
        if self.window_secs == 0 || self.window_secs > MAX_SECS || self.grace_secs > MAX_SECS {
            return Err(shape(format!(
                "window_secs {} must be in 1..={MAX_SECS} and grace_secs {} at most {MAX_SECS}",
                self.window_secs, self.grace_secs
            )));
        }
        for pair in self.model.tensors.windows(2) {
            if pair[0].name.as_bytes() >= pair[1].name.as_bytes() {
                return Err(shape(format!(
                    "model tensors are not in strictly ascending name order ({:?} then {:?})",
                    pair[0].name, pair[1].name
                )));
            }
        }
        for t in &self.model.tensors {
            let n = t.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            if n.is_none_or(|n| n > MAX_TENSOR_ELEMENTS) {
                return Err(shape(format!(
                    "model tensor {:?} {:?} has more than {MAX_TENSOR_ELEMENTS} elements",
                    t.name, t.shape
                )));
            }
        }
        self.codec.validate().map_err(|e| shape(e.to_string()))?;
        if !(1..=MAX_SECTION_BYTES).contains(&self.section_bytes) {
            return Err(shape(format!(
                "section_bytes {} is not in 1..={MAX_SECTION_BYTES}",
                self.section_bytes
            )));
        }
        let ratio = self.limits.clip_norm_ratio;
        if !(ratio.is_finite() && ratio >= 1.0) {
            return Err(shape(format!(
                "clip_norm_ratio {ratio} is not a finite number ≥ 1"
            )));
        }
        for p in &self.participants {
            PeerId::parse(&p.peer).map_err(|e| shape(e.to_string()))?;
        }
        // The original plain-SGD setting (`beta`, `outer_lr`) obeys the same rules.
        let original = Setting {
            from_window: 0,
            outer: Outer::sgd(self.outer_lr),
            beta: self.beta,
        };
        if let Some(p) = original.problem() {
            return Err(setting(format!(
                "the original setting (beta, outer_lr): {p}"
            )));
        }
        for pair in self.settings.windows(2) {
            if pair[0].from_window >= pair[1].from_window {
                return Err(setting(format!(
                    "settings are not in ascending from_window order ({} then {})",
                    pair[0].from_window, pair[1].from_window
                )));
            }
        }
        for s in &self.settings {
            if let Some(p) = s.problem() {
                return Err(setting(format!(
                    "the setting from window {}: {p}",
                    s.from_window
                )));
            }
        }
        Ok(())
    }
}
