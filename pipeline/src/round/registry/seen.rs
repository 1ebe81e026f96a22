//! What this machine has seen of each registry: the highest revision and the run's history
//! as it stood then (`round.md`, "Registry history").
//!
//! A registry is one mutable object. Its signature proves the operator made a revision, not
//! that it is the newest one, nor that it leaves the past alone: whoever can write the
//! operator's bucket can put an older, validly signed revision back (a participant added
//! later disappears), and a compromised operator key can sign a revision that rewrites the
//! setting of a window peers already applied (replays then differ). A reader therefore
//! remembers, per registry URL, the highest revision it accepted and that revision's
//! history, and refuses a lower revision (`registry_rollback`), another document under the
//! same revision (`registry_rollback`), or a newer one that changes the run's frame or
//! anything of a window that had opened when it was stored (`settings_rewritten`). A
//! registry with another frame and a later genesis is a new run made at the same URL.
//!
//! The memory is a small JSON file in the state folder (`SHARDROP_STATE_DIR`, else
//! `$XDG_STATE_HOME/shardrop`, else `~/.local/state/shardrop`). It is best effort: a reader
//! that cannot write it (a read-only container) warns and goes on, checking within its own
//! process only. The file is replaced atomically; two processes racing may each keep the
//! other's older entry, never a lower revision than either saw.

use crate::round::RoundReason;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::{Registry, RegistryError};
use crate::round::outer::Setting;

/// One registry as last accepted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Seen {
    /// Its revision.
    pub revision: u64,
    /// blake3 of its JSON document: a second document under the same revision is a fork.
    pub digest: String,
    /// blake3 of what no revision may change: run, operator, genesis, window and grace
    /// lengths, model, codec, section size and the original setting (the aggregate format
    /// may move from agg-v1 to agg-v2: readers go by each aggregate's own codec).
    pub frame: String,
    /// The settings history.
    pub settings: Vec<Setting>,
    /// When its window 0 began.
    pub genesis_ms: u64,
    /// When its store took it (ms). Windows open by then are history for every later
    /// revision; a registry at the same URL whose genesis is later than this is a new run
    /// made there (`run init` after the old one was deleted), not a rollback.
    #[serde(default)]
    pub stored_ms: u64,
}

/// Memory within this process, for readers whose state folder is not writable.
static IN_PROCESS: Mutex<BTreeMap<String, Seen>> = Mutex::new(BTreeMap::new());

const FILE: &str = "registries-seen.json";

fn state_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("SHARDROP_STATE_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME") {
        return Some(PathBuf::from(d).join("shardrop"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state/shardrop"))
}

fn read_file() -> BTreeMap<String, Seen> {
    let Some(path) = state_dir().map(|d| d.join(FILE)) else {
        return BTreeMap::new();
    };
    match crate::files::read_regular(&path, 16 << 20) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(file = %path.display(), error = %e, "unreadable registry memory; starting afresh");
            BTreeMap::new()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "registry memory not read");
            BTreeMap::new()
        }
    }
}

fn write_file(all: &BTreeMap<String, Seen>) {
    let Some(dir) = state_dir() else {
        return;
    };
    let written = std::fs::create_dir_all(&dir).and_then(|()| {
        let bytes = serde_json::to_vec(all).map_err(std::io::Error::other)?;
        crate::files::write_replace(&dir, &dir.join(FILE), &bytes)
    });
    if let Err(e) = written {
        tracing::warn!(dir = %dir.display(), error = %e, "registry memory not saved: rollbacks are only caught within this process");
    }
}

impl Registry {
    /// What no revision may change, hashed.
    fn frame_digest(&self) -> String {
        let frame = serde_json::json!({
            "run": self.run, "operator": self.operator, "genesis_ms": self.genesis_ms,
            "window_secs": self.window_secs, "grace_secs": self.grace_secs,
            "model": self.model, "codec": self.codec, "section_bytes": self.section_bytes,
            "beta": self.beta, "outer_lr": self.outer_lr,
        });
        blake3::hash(frame.to_string().as_bytes())
            .to_hex()
            .to_string()
    }

    /// Checks a registry just read from `object` (stored at `stored_ms` by its store's
    /// clock) against what this machine saw of it before, then remembers it.
    pub(super) fn check_history(
        &self,
        object: &str,
        json: &[u8],
        stored_ms: u64,
    ) -> Result<(), RegistryError> {
        let now = Seen {
            revision: self.revision,
            digest: blake3::hash(json).to_hex().to_string(),
            frame: self.frame_digest(),
            settings: self.settings.clone(),
            genesis_ms: self.genesis_ms,
            stored_ms,
        };
        let mut memory = IN_PROCESS.lock().unwrap_or_else(|p| p.into_inner());
        let mut all = read_file();
        for (k, v) in memory.iter() {
            if all.get(k).is_none_or(|f| f.revision < v.revision) {
                all.insert(k.clone(), v.clone());
            }
        }
        let bad = |reason: RoundReason, detail: String| RegistryError::Rejected {
            object: object.to_string(),
            reason,
            detail,
        };
        // A new run at the same URL starts after everything the old one had stored, so it
        // cannot cover windows the old run had already opened.
        let renewed = all
            .get(object)
            .is_some_and(|b| b.frame != now.frame && now.genesis_ms > b.stored_ms);
        if renewed {
            tracing::info!(object, "a new run at this registry's URL (a later genesis)");
        }
        if let Some(before) = all.get(object).filter(|_| !renewed) {
            if now.revision < before.revision {
                return Err(bad(
                    RoundReason::RegistryRollback,
                    format!(
                        "revision {} is older than revision {} this machine already read (an old revision put back; if the run was deliberately made again at this URL with an earlier genesis, remove its entry from {FILE} in the state folder)",
                        now.revision, before.revision
                    ),
                ));
            }
            if now.revision == before.revision && now.digest != before.digest {
                return Err(bad(
                    RoundReason::RegistryRollback,
                    format!(
                        "another document under revision {} than the one this machine read (a fork)",
                        now.revision
                    ),
                ));
            }
            if now.revision > before.revision {
                if now.frame != before.frame {
                    return Err(bad(
                        RoundReason::SettingsRewritten,
                        "the run's frame changed (genesis, window or grace length, model, codec, section size or original setting): no revision may change it".into(),
                    ));
                }
                let clock = crate::round::window::RunClock::new(
                    self.genesis_ms,
                    self.window_secs,
                    self.grace_secs,
                );
                // Windows open when the remembered revision was stored are history: no later
                // revision may change the setting in force for them. (Windows that opened
                // since may have been changed by a revision this machine never saw, made
                // before they opened, so they are not compared.)
                if let Some(open) = clock.window_at(before.stored_ms) {
                    let old = Registry {
                        settings: before.settings.clone(),
                        ..self.clone()
                    };
                    // The setting in force is constant between entries: comparing it at every
                    // entry's first window (of either history) up to `open` compares them all.
                    let mut at: Vec<u64> = old
                        .settings
                        .iter()
                        .chain(&self.settings)
                        .map(|s| s.from_window)
                        .filter(|&w| w <= open)
                        .chain([0])
                        .collect();
                    at.sort_unstable();
                    at.dedup();
                    let same = |w: u64| {
                        let (a, b) = (old.setting_at(w), self.setting_at(w));
                        a.outer == b.outer && a.beta == b.beta && a.origin() == b.origin()
                    };
                    if let Some(w) = at.into_iter().find(|&w| !same(w)) {
                        return Err(bad(
                            RoundReason::SettingsRewritten,
                            format!(
                                "revision {} changes the setting of window {w}, which was open (up to window {open}) when revision {} was stored; settings may only change from windows not yet open",
                                now.revision, before.revision
                            ),
                        ));
                    }
                }
            }
        }
        if renewed || all.get(object).is_none_or(|b| b.revision < now.revision) {
            all.insert(object.to_string(), now.clone());
            memory.insert(object.to_string(), now);
            write_file(&all);
        }
        Ok(())
    }
}
