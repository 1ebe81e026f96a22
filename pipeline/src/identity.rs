//! Keys and peer ids.
//!
//! A participant *is* its ed25519 key: the peer id is the public key in lowercase hex, so an id
//! can be checked against a signature without any directory service. Secret key files hold
//! the 32-byte seed in hex behind a versioned first line, are created with mode 0600, and are
//! refused when group or others can read them: a leaked miner key lets anyone publish in its
//! name.

use std::fmt;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand::RngCore;

/// First line of every secret key file; a later format gets a new line.
const KEY_FILE_TAG: &str = "shardrop-ed25519-secret-v1";

/// Why a key could not be made, loaded or parsed.
// Each variant's fields are the parts of its message (`#[error]`), documented there.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A key file is already there: keys are never overwritten.
    #[error("{path}: refusing to overwrite an existing key file")]
    Exists { path: PathBuf },
    #[error(
        "{path}: key file is readable by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    /// The key file is readable by others.
    Permissions { path: PathBuf, mode: u32 },
    /// The file is not a shardrop key.
    #[error("{path}: not a shardrop key file ({reason})")]
    Format { path: PathBuf, reason: String },
    /// The key file could not be read or written (a missing one is the caller's: make it
    /// with `shardrop keygen --out PATH`).
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not 64 lowercase hex characters of a valid ed25519 public key.
    #[error("invalid peer id {id:?}: {reason}")]
    PeerId { id: String, reason: String },
}

impl crate::error::Classified for IdentityError {
    /// A key the caller must fix (an existing file is a conflict: keys are never
    /// overwritten); a disk that failed is `store`, with its path.
    fn class(&self) -> crate::error::ErrorClass {
        use crate::error::ErrorClass;
        match self {
            IdentityError::Exists { .. } => ErrorClass::Conflict,
            IdentityError::Permissions { .. }
            | IdentityError::Format { .. }
            | IdentityError::PeerId { .. } => ErrorClass::Caller,
            // No key at the path given: the call names the wrong file (or `keygen` was not
            // run); retrying will not help.
            IdentityError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ErrorClass::Caller
            }
            IdentityError::Io { .. } => ErrorClass::Store,
        }
    }

    fn reason(&self) -> Option<&'static str> {
        None
    }

    fn object(&self) -> Option<&str> {
        match self {
            IdentityError::Exists { path }
            | IdentityError::Permissions { path, .. }
            | IdentityError::Format { path, .. }
            | IdentityError::Io { path, .. } => path.to_str(),
            IdentityError::PeerId { .. } => None,
        }
    }
}

/// A participant's public identity: its ed25519 verifying key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId([u8; 32]);

impl PeerId {
    /// Parses the 64-character lowercase hex form used everywhere (registries, headers, keys).
    pub fn parse(s: &str) -> Result<Self, IdentityError> {
        let bad = |reason: &str| IdentityError::PeerId {
            id: s.chars().take(80).collect(),
            reason: reason.to_string(),
        };
        if s.len() != 64
            || !s
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(bad("expected 64 lowercase hex characters"));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|e| bad(&e.to_string()))?;
        VerifyingKey::from_bytes(&out).map_err(|_| bad("not a valid ed25519 public key"))?;
        Ok(PeerId(out))
    }

    /// The 32 bytes of the public key.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Checks an ed25519 signature by this peer over `msg`.
    pub fn verify(&self, msg: &[u8], sig: &[u8; 64]) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        // verify_strict rejects small-order keys and non-canonical signatures, so one
        // (message, key) pair has exactly one valid signature encoding.
        key.verify_strict(msg, &Signature::from_bytes(sig)).is_ok()
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({})", hex::encode(&self.0[..6]))
    }
}

/// A secret signing key together with its peer id.
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        write!(f, "Identity({:?})", self.peer_id())
    }
}

impl Identity {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Self {
        let mut seed = [0u8; 32];
        rand::rng().fill_bytes(&mut seed);
        Self::from_seed(seed)
    }

    /// A key from a fixed seed: for golden vectors and reproducible simulations only.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Identity {
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// The public key: the identity other peers and registries know.
    pub fn peer_id(&self) -> PeerId {
        PeerId(self.key.verifying_key().to_bytes())
    }

    /// An ed25519 signature of `msg`.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.key.sign(msg).to_bytes()
    }

    /// Writes a new key file with mode 0600; never replaces an existing file.
    pub fn save_new(&self, path: &Path) -> Result<(), IdentityError> {
        let io = |source| IdentityError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut file = opts.open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                IdentityError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                io(e)
            }
        })?;
        let body = format!("{KEY_FILE_TAG}\n{}\n", hex::encode(self.key.to_bytes()));
        file.write_all(body.as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(())
    }

    /// Loads a key file, refusing one that group or others can read.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let io = |source| IdentityError::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        if !meta.is_file() {
            // A FIFO or device would block or never end; a key is a small plain file.
            return Err(IdentityError::Format {
                path: path.to_path_buf(),
                reason: "not a plain file".to_string(),
            });
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(IdentityError::Permissions {
                    path: path.to_path_buf(),
                    mode,
                });
            }
        }
        let format = |reason: &str| IdentityError::Format {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        if meta.len() > 4096 {
            return Err(format("file too large"));
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        let mut lines = text.lines();
        if lines.next() != Some(KEY_FILE_TAG) {
            return Err(format(&format!("first line must be {KEY_FILE_TAG}")));
        }
        let seed_hex = lines.next().unwrap_or("").trim();
        let mut seed = [0u8; 32];
        hex::decode_to_slice(seed_hex, &mut seed)
            .map_err(|_| format("second line must be 64 hex characters"))?;
        Ok(Self::from_seed(seed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_roundtrip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let id = Identity::generate();
        id.save_new(&path).unwrap();
        assert_eq!(Identity::load(&path).unwrap().peer_id(), id.peer_id());
        assert!(matches!(
            id.save_new(&path),
            Err(IdentityError::Exists { .. })
        ));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let err = Identity::load(&path).unwrap_err();
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
    }

    #[test]
    fn peer_id_parse_and_verify() {
        let id = Identity::from_seed([7; 32]);
        let pid = PeerId::parse(&id.peer_id().to_string()).unwrap();
        let sig = id.sign(b"hello");
        assert!(pid.verify(b"hello", &sig));
        assert!(!pid.verify(b"hellp", &sig));
        assert!(PeerId::parse("zz").is_err());
        assert!(PeerId::parse(&"A".repeat(64)).is_err());
    }
}
