//! The registry as a signed object: create it, load it (verified, the reader rules, what
//! this machine remembers of its history), replace it by compare-and-swap.

use super::*;
use crate::format::envelope::{Compression, EnvelopeBuilder, Expect, Kind, Limits};
use crate::format::layout;
use crate::identity::{Identity, PeerId};
use crate::round::RoundReason;
use crate::store::{self, S3Options, StoreError, Target};
use bytes::Bytes;

impl Registry {
    /// Signs this registry with the operator's key.
    pub(super) fn sign(&self, operator: &Identity) -> Result<Vec<u8>, RegistryError> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| RegistryError::Invalid {
            object: "registry".into(),
            reason: e.to_string(),
        })?;
        EnvelopeBuilder::new(Kind::Registry, &self.run)
            .codec("registry-v1", Default::default())
            .section(SECTION, &json, Compression::Zstd)?
            .sign(operator)?
            .to_vec()
            .map_err(|e| RegistryError::Invalid {
                object: "registry".into(),
                reason: e.to_string(),
            })
    }

    /// Creates the registry object (refuses to replace an existing one).
    pub async fn create(
        &self,
        target: &Target,
        operator: &Identity,
    ) -> Result<String, RegistryError> {
        let path = target.path(&layout::registry(&self.run));
        let object = target.url_of(&path);
        self.validate(&object)?;
        if self.operator != operator.peer_id().to_string() {
            return Err(RegistryError::Invalid {
                object,
                reason: "the signing key is not the registry's operator".into(),
            });
        }
        let bytes = self.sign(operator)?;
        store::put_cas(target, &path, Bytes::from(bytes), None)
            .await
            .map_err(|e| match e {
                StoreError::Precondition { object } => RegistryError::Invalid {
                    object,
                    reason: "a registry already exists for this run".into(),
                },
                e => e.into(),
            })?;
        Ok(object)
    }

    /// Loads and verifies a registry: signed by the operator it names (and by `operator`,
    /// when the caller pins one), and no older than what this machine has seen of it
    /// (`seen`). Returns it with the object's ETag for a later update.
    ///
    /// A read that began before a newer revision landed may complete after another reader
    /// (a task of this process, or a job sharing the state folder) recorded that revision:
    /// stale, not a rollback. So an apparent rollback is read again, up to 3 times 0.5 s
    /// apart; a revision put back stays there and is refused.
    pub async fn load(
        url: &str,
        s3: &S3Options,
        operator: Option<PeerId>,
    ) -> Result<(Registry, Option<String>), RegistryError> {
        if !url.trim_end_matches('/').ends_with("/registry") {
            return Err(RegistryError::Invalid {
                object: url.to_string(),
                reason: "not a registry URL: it ends in /runs/RUN/registry (what `shardrop run init` printed)".into(),
            });
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (reg, etag, object, json, stored_ms) =
                match Self::load_once(url, s3, operator).await {
                    Err(e)
                        if crate::error::Classified::class(&e)
                            == crate::error::ErrorClass::NotFound =>
                    {
                        return Err(explain_missing(url, s3).await);
                    }
                    r => r?,
                };
            match reg.check_history(&object, &json, stored_ms) {
                Ok(()) => return Ok((reg, etag)),
                Err(RegistryError::Rejected {
                    reason: RoundReason::RegistryRollback,
                    ..
                }) if attempt < 4 => {
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One verified read: the registry, its ETag, its URL, its JSON and when it was stored.
    async fn load_once(
        url: &str,
        s3: &S3Options,
        operator: Option<PeerId>,
    ) -> Result<(Registry, Option<String>, String, Vec<u8>, u64), RegistryError> {
        let (target, path) = store::open_object(url, s3)?;
        let object = target.url_of(&path);
        let limits = Limits::small_object();
        let expect = Expect {
            signer: operator,
            kind: Some(Kind::Registry),
            ..Default::default()
        };
        let (env, sections) = crate::format::envelope::read_whole_consistent(
            target.store.as_ref(),
            &path,
            &object,
            &limits,
            &expect,
        )
        .await?;
        let json = env
            .sections()
            .iter()
            .zip(sections)
            .find_map(|(e, body)| (e.name == SECTION).then_some(body))
            .ok_or_else(|| RegistryError::Rejected {
                object: object.clone(),
                reason: RoundReason::RegistryInvalid,
                detail: format!("no section named {SECTION:?}"),
            })?;
        let reg: Registry = serde_json::from_slice(&json).map_err(|e| RegistryError::Rejected {
            object: object.clone(),
            reason: RoundReason::RegistryInvalid,
            detail: format!("registry JSON: {e}"),
        })?;
        reg.validate(&object)?;
        if reg.operator != env.signer.to_string() || reg.run != env.head.header.run {
            return Err(RegistryError::Rejected {
                object,
                reason: RoundReason::RegistryInvalid,
                detail: "signed by a key other than the operator it names, or for another run"
                    .into(),
            });
        }
        // When the store took this revision; a whole-second time (S3's HEAD) is read as the
        // end of its second, so a revision that landed just after a window opened counts
        // as landed after it.
        let lm = env.meta.last_modified.timestamp_millis().max(0) as u64;
        let stored_ms = crate::round::window::end_of_second(lm);
        let etag = env.meta.e_tag.clone();
        Ok((reg, etag, object, json, stored_ms))
    }

    /// Replaces the registry at `url` with `self` (revision + 1), only if it is still the
    /// version whose ETag is `etag`.
    pub async fn update(
        &mut self,
        url: &str,
        s3: &S3Options,
        etag: Option<String>,
        operator: &Identity,
    ) -> Result<(), RegistryError> {
        let (target, path) = store::open_object(url, s3)?;
        let object = target.url_of(&path);
        self.revision += 1;
        self.validate(&object)?;
        let bytes = self.sign(operator)?;
        store::put_cas(&target, &path, Bytes::from(bytes), etag).await?;
        Ok(())
    }
}

/// What a reader is told when there is no registry at `url`: the runs the store under it
/// holds (a wrong run name), or that the store cannot be listed (a wrong bucket or
/// credentials).
async fn explain_missing(url: &str, s3: &S3Options) -> RegistryError {
    let root = url.rsplit_once("/runs/").map_or(url, |(r, _)| r);
    let listed = match store::open(root, s3) {
        Ok(t) => t
            .store
            .list_with_delimiter(Some(&t.path("runs")))
            .await
            .map(|l| {
                l.common_prefixes
                    .iter()
                    .filter_map(|p| p.filename().map(str::to_string))
                    .collect::<Vec<_>>()
            })
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let detail = match listed {
        Ok(runs) if !runs.is_empty() => {
            let shown: Vec<String> = runs
                .iter()
                .take(10)
                .map(|r| format!("{root}/runs/{r}/registry"))
                .collect();
            format!(
                "no registry here; {root} holds {} run(s): {}{}",
                runs.len(),
                shown.join(", "),
                if runs.len() > 10 { ", …" } else { "" }
            )
        }
        Ok(_) => format!(
            "no registry here, and {root} holds no run: is it the operator's store (`shardrop run init --store {root}` creates one)?"
        ),
        Err(e) => format!(
            "no registry here, and {root} cannot be listed ({}): check the bucket name, the endpoint and the credentials",
            e.lines().next().unwrap_or_default()
        ),
    };
    RegistryError::NotFound {
        object: url.to_string(),
        detail,
    }
}
