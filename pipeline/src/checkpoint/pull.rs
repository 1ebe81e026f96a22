//! `ckpt pull`: verify the manifest, then fetch with parallel ranged GETs, verifying every
//! piece before it is written, into a Hugging Face-loadable folder.
//!
//! Whole pulls fetch shards in `chunk_bytes` ranges, each checked against its chunk hash;
//! a rerun re-hashes what a killed run left in `OUT/.shardrop-partial/` and fetches only the
//! chunks that are missing or wrong. Partial pulls (`--tensors`, `--tp-*`) fetch only the
//! selected tensors' byte ranges, each checked against its tensor hash, and write new
//! shards holding just those. Finished files are recorded (name → blake3) in
//! `OUT/.shardrop-pull.json`; a rerun skips them after re-hashing them locally. Nothing is
//! ever written outside OUT, and no file appears under its final name until it is complete.

use crate::checkpoint::BadObject;
use crate::checkpoint::CkptReason;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use object_store::{GetOptions, GetRange};

use super::push::{read_latest, read_signed_json};
use super::{CkptError, HF_INDEX, LOCAL_MANIFEST, Manifest, TensorEntry, dtype_size, io_err};
use crate::format::envelope::{Expect, Kind};
use crate::format::layout;
use crate::identity::PeerId;
use crate::round::registry::Registry;
use crate::store::{self, S3Options, StoreError, Target};

const PARTIAL: &str = ".shardrop-partial";
const STATE: &str = ".shardrop-pull.json";
/// Where `--force` moves what was in OUT that no earlier pull of the run wrote.
const DISPLACED: &str = ".shardrop-displaced";

/// Where a checkpoint lives and who must have signed it.
#[derive(Clone)]
pub struct Located {
    /// The store holding it.
    pub target: Target,
    /// The run.
    pub run: String,
    /// The step.
    pub step: u64,
    /// The key that must have signed the manifest.
    pub signer: PeerId,
}

/// `latest` (with a registry), or a manifest URL `…/runs/<run>/ckpt/<step>/manifest`, whose
/// signer is the registry's aggregator or `signer`.
pub async fn locate(
    what: &str,
    reg: Option<&Registry>,
    signer: Option<PeerId>,
    s3: &S3Options,
) -> Result<Located, CkptError> {
    if what == "latest" {
        let reg = reg.ok_or_else(|| {
            CkptError::Caller("`latest` needs --registry (to find the checkpoint store)".into())
        })?;
        let (peer, target) = reg.aggregator(s3)?;
        let (latest, _) = read_latest(&target, &reg.run, &peer)
            .await?
            .ok_or_else(|| CkptError::Missing {
                object: target.url_of(&target.path(&layout::ckpt_latest(&reg.run))),
                detail: "no LATEST checkpoint yet".into(),
            })?;
        return Ok(Located {
            target,
            run: reg.run.clone(),
            step: latest.step,
            signer: peer,
        });
    }
    let parts: Vec<&str> = what.trim_end_matches('/').rsplitn(6, '/').collect();
    let (run, step, base) = match parts[..] {
        ["manifest", step, "ckpt", run, "runs", base] if !base.is_empty() => {
            let step: u64 = step
                .parse()
                .map_err(|_| CkptError::Caller(format!("{what}: bad step {step:?}")))?;
            (run.to_string(), step, base)
        }
        _ => {
            return Err(CkptError::Caller(format!(
                "{what}: expected `latest` or a manifest URL ending in runs/<run>/ckpt/<step>/manifest"
            )));
        }
    };
    let target = store::open(base, s3)?;
    let signer = match (reg, signer) {
        (_, Some(p)) => p,
        (Some(reg), None) => {
            if reg.run != run {
                return Err(CkptError::Caller(format!(
                    "{what} belongs to run {run}, the registry to run {}",
                    reg.run
                )));
            }
            reg.aggregator(s3)?.0
        }
        (None, None) => {
            return Err(CkptError::Caller(
                "say who must have signed the manifest: --registry URL or --signer PEER".into(),
            ));
        }
    };
    Ok(Located {
        target,
        run,
        step,
        signer,
    })
}

/// Fetches and verifies the manifest (signature, signer, run, step, structure).
pub async fn fetch_manifest(loc: &Located) -> Result<(Manifest, Vec<u8>, String), CkptError> {
    let expect = Expect {
        signer: Some(loc.signer),
        run: Some(loc.run.clone()),
        kind: Some(Kind::Manifest),
        window: None,
        step: Some(loc.step),
    };
    let (env, body) = read_signed_json(
        &loc.target,
        &layout::ckpt_manifest(&loc.run, loc.step),
        &expect,
    )
    .await?;
    let m: Manifest = serde_json::from_slice(&body).map_err(|e| CkptError::Rejected {
        object: env.object.clone(),
        reason: CkptReason::ManifestMalformed.code(),
        detail: format!("manifest is not valid JSON: {e}"),
    })?;
    if m.run != loc.run || m.step != loc.step || env.head.header.window != m.window {
        return Err(CkptError::Rejected {
            object: env.object.clone(),
            reason: CkptReason::ManifestMalformed.code(),
            detail: "the manifest's run, step or window disagrees with its signed header".into(),
        });
    }
    m.validate().map_err(|e| match e {
        e @ CkptError::Rejected { reason, .. } => CkptError::Rejected {
            object: env.object.clone(),
            reason,
            detail: e.to_string(),
        },
        other => other,
    })?;
    Ok((m, body, env.object))
}

/// What to pull and how fast.
#[derive(Clone, Debug, Default)]
pub struct PullOptions {
    /// Only tensors matching one of these globs (all when empty).
    pub tensors: Vec<String>,
    /// `(rank, size)`: slice 2-D tensors for tensor parallelism (`schemas/checkpoint.md`).
    pub tp: Option<(u64, u64)>,
    /// Ranged GETs in flight.
    pub concurrency: usize,
    /// Pull into a folder that holds files no earlier pull of this run wrote: they are moved
    /// into `OUT/.shardrop-displaced/` first (never mixed with the checkpoint's, never
    /// deleted). Without it such a folder is refused.
    pub force: bool,
    /// Leave out the outer optimizer's momentum buffers (`momentum-*.safetensors`): what a
    /// post-training team wants (a 72 B model's f32 momentum is 288 GB, twice its bf16
    /// weights); a peer that replays aggregates with momentum needs them.
    pub without_momentum: bool,
}

/// What a pull did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Pulled {
    /// The folder written.
    pub out: String,
    /// The checkpoint's step.
    pub step: u64,
    /// The last window in its parameters (replay from the next one).
    pub window: Option<u64>,
    /// Files written.
    pub files: usize,
    /// Tensors selected.
    pub tensors: usize,
    /// Bytes fetched from the store in this run.
    pub fetched_bytes: u64,
    /// Bytes found already present and correct (a resumed pull).
    pub reused_bytes: u64,
    /// Bytes of the files written.
    pub written_bytes: u64,
}

/// How a tensor is cut for tensor parallelism: the dimension, or `None` (replicated).
/// Row-parallel layers (output projections) split their input dimension (1); everything
/// else 2-D splits dimension 0 (column-parallel layers, embeddings, the LM head).
pub fn tp_dim(name: &str, shape: &[u64]) -> Option<usize> {
    if shape.len() != 2 {
        return None;
    }
    const ROW_PARALLEL: [&str; 6] = [
        "o_proj",
        "down_proj",
        "out_proj",
        "fc2",
        "dense_4h_to_h",
        "c_proj",
    ];
    if ROW_PARALLEL.iter().any(|p| name.contains(p)) {
        Some(1)
    } else {
        Some(0)
    }
}

/// One tensor of a partial pull: where it goes and how it is cut.
struct Item {
    tensor: usize,
    dst: u64,
    len: u64,
    cut: Option<(usize, u64, u64)>,
}

enum Plan {
    Whole {
        shard: usize,
    },
    Subset {
        shard: usize,
        header: Vec<u8>,
        items: Vec<Item>,
    },
}

struct OutFile {
    name: String,
    size: u64,
    plan: Plan,
}

fn plan_subset(
    m: &Manifest,
    selected: &[usize],
    tp: Option<(u64, u64)>,
) -> Result<Vec<OutFile>, CkptError> {
    let mut by_shard: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for &i in selected {
        by_shard.entry(m.tensors[i].shard).or_default().push(i);
    }
    let mut out = Vec::new();
    for (shard, mut ts) in by_shard {
        ts.sort_by_key(|&i| m.tensors[i].begin);
        let mut cuts = Vec::with_capacity(ts.len());
        for &i in &ts {
            let t = &m.tensors[i];
            let es = dtype_size(&t.dtype).unwrap_or(1);
            let (shape, cut) = match (tp, tp_dim(&t.name, &t.shape)) {
                (Some((rank, n)), Some(d)) => {
                    if !t.shape[d].is_multiple_of(n) {
                        return Err(CkptError::Caller(format!(
                            "tensor {}: dimension {d} ({}) is not divisible by --tp-size {n}",
                            t.name, t.shape[d]
                        )));
                    }
                    let part = t.shape[d] / n;
                    let mut s = t.shape.clone();
                    s[d] = part;
                    (s, Some((d, rank * part, part)))
                }
                _ => (t.shape.clone(), None),
            };
            let len = shape.iter().product::<u64>() * es;
            cuts.push((shape, cut, len));
        }
        let entries: Vec<(&str, &str, &[u64], u64)> = ts
            .iter()
            .zip(&cuts)
            .map(|(&i, (shape, _, len))| {
                let t = &m.tensors[i];
                (t.name.as_str(), t.dtype.as_str(), shape.as_slice(), *len)
            })
            .collect();
        let (header, begins) = super::packing::st_header(&entries);
        let items: Vec<Item> = ts
            .iter()
            .zip(&cuts)
            .zip(begins)
            .map(|((&i, (_, cut, len)), dst)| Item {
                tensor: i,
                dst,
                len: *len,
                cut: *cut,
            })
            .collect();
        let size = header.len() as u64 + cuts.iter().map(|c| c.2).sum::<u64>();
        out.push(OutFile {
            name: m.shards[shard].file.clone(),
            size,
            plan: Plan::Subset {
                shard,
                header,
                items,
            },
        });
    }
    Ok(out)
}

fn blake3_file(path: &Path) -> std::io::Result<String> {
    let mut h = blake3::Hasher::new();
    h.update_reader(File::open(path)?)?;
    Ok(h.finalize().to_hex().to_string())
}

/// Opens (creating if missing) a file a pull writes, never through a symbolic link
/// (`O_NOFOLLOW`), only if it is a plain file, and only if it has a single name: a symbolic
/// link planted in OUT or its partial folder is refused, never followed, and so is a hard
/// link (which `O_NOFOLLOW` cannot see), whose other name may be any file outside OUT.
fn open_nofollow(path: &Path) -> Result<File, CkptError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => CkptError::Caller(format!(
                "{}: is a link; refusing to write through it",
                path.display()
            )),
            _ => io_err(path, e),
        })?;
    use std::os::unix::fs::MetadataExt;
    match file.metadata() {
        Ok(m) if m.is_file() && m.nlink() == 1 => Ok(file),
        Ok(m) if m.is_file() => Err(CkptError::Caller(format!(
            "{}: has {} names (a hard link); refusing to write through it",
            path.display(),
            m.nlink()
        ))),
        Ok(_) => Err(CkptError::Caller(format!(
            "{}: is not a plain file; refusing to write to it",
            path.display()
        ))),
        Err(e) => Err(io_err(path, e)),
    }
}

/// `files::write_replace`, naming the file in the error.
fn write_replace(tmp_dir: &Path, dest: &Path, bytes: &[u8]) -> Result<(), CkptError> {
    crate::files::write_replace(tmp_dir, dest, bytes).map_err(|e| io_err(dest, e))
}

/// A pulled shard's own safetensors header must list exactly the manifest's tensors of that
/// shard, with the same dtypes, shapes and byte ranges: a loader (transformers, safetensors)
/// reads the header, not the manifest, so a pusher must not be able to sign one layout and
/// ship another.
fn check_shard_header(file: &File, m: &Manifest, shard: usize) -> Result<(), BadObject> {
    use std::os::unix::fs::FileExt;
    let size = m.shards[shard].size;
    let mut n8 = [0u8; 8];
    file.read_exact_at(&mut n8, 0)
        .map_err(|e| BadObject(format!("reading its header: {e}")))?;
    let n = u64::from_le_bytes(n8);
    if n > 100 << 20 || 8 + n > size {
        return Err(BadObject(format!(
            "header length {n} for a {size}-byte file"
        )));
    }
    let mut raw = vec![0u8; n as usize];
    file.read_exact_at(&mut raw, 8)
        .map_err(|e| BadObject(format!("reading its header: {e}")))?;
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&raw).map_err(|e| BadObject(format!("header JSON: {e}")))?;
    let want: BTreeMap<&str, &TensorEntry> = m
        .tensors
        .iter()
        .filter(|t| t.shard == shard)
        .map(|t| (t.name.as_str(), t))
        .collect();
    let got: Vec<&String> = header.keys().filter(|k| *k != "__metadata__").collect();
    if got.len() != want.len() {
        return Err(BadObject(format!(
            "{} tensors in the header, {} in the manifest",
            got.len(),
            want.len()
        )));
    }
    for name in got {
        let t = want
            .get(name.as_str())
            .ok_or_else(|| BadObject(format!("tensor {name:?} is not in the manifest")))?;
        let v = &header[name];
        let offsets: Option<Vec<u64>> = v["data_offsets"]
            .as_array()
            .and_then(|a| a.iter().map(|x| x.as_u64()).collect());
        let shape: Option<Vec<u64>> = v["shape"]
            .as_array()
            .and_then(|a| a.iter().map(|x| x.as_u64()).collect());
        let ok = t.begin >= 8 + n
            && v["dtype"].as_str() == Some(t.dtype.as_str())
            && shape.as_deref() == Some(t.shape.as_slice())
            && offsets.as_deref() == Some(&[t.begin - 8 - n, t.end - 8 - n][..]);
        if !ok {
            return Err(BadObject(format!(
                "tensor {name:?}: dtype, shape or offsets differ"
            )));
        }
    }
    Ok(())
}

/// A path inside OUT that is not a link (a pull never writes through one).
fn inside(out: &Path, name: &str) -> Result<PathBuf, CkptError> {
    // One plain component: never an absolute path, `..` or a sub-folder.
    let mut parts = Path::new(name).components();
    if !matches!(
        (parts.next(), parts.next()),
        (Some(std::path::Component::Normal(_)), None)
    ) {
        return Err(CkptError::Caller(format!(
            "{name:?}: not a plain file name; refusing to write or remove it"
        )));
    }
    let p = out.join(name);
    if let Ok(meta) = std::fs::symlink_metadata(&p)
        && (meta.file_type().is_symlink() || meta.is_dir())
    {
        return Err(CkptError::Caller(format!(
            "{}: is a link or a folder; refusing to write through it",
            p.display()
        )));
    }
    Ok(p)
}

/// Starts a ranged GET of `key`; the URL names the object in every error.
async fn open_range(
    target: &Target,
    key: &str,
    r: std::ops::Range<u64>,
) -> Result<(String, object_store::GetResult), CkptError> {
    let path = target.path(key);
    let url = target.url_of(&path);
    let got = target
        .store
        .get_opts(
            &path,
            GetOptions {
                range: Some(GetRange::Bounded(r)),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| StoreError::from_store(&url, e))?;
    Ok((url, got))
}

async fn get_range(
    target: &Target,
    key: &str,
    r: std::ops::Range<u64>,
) -> Result<bytes::Bytes, CkptError> {
    let (url, got) = open_range(target, key, r.clone()).await?;
    let b = got
        .bytes()
        .await
        .map_err(|e| StoreError::from_store(&url, e))?;
    if b.len() as u64 != r.end - r.start {
        return Err(CkptError::Mismatch(vec![format!(
            "{url}: bytes {}..{} came back {} bytes long (truncated object?)",
            r.start,
            r.end,
            b.len()
        )]));
    }
    Ok(b)
}

/// Pulls a verified checkpoint into `out`: the manifest, then every selected file (in
/// parallel, resumable, each checked chunk by chunk and renamed into place once whole), the
/// small files, the Hugging Face index and the local manifest.
pub async fn pull(
    loc: &Located,
    out: &Path,
    opts: &PullOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Pulled, CkptError> {
    let (m, body, murl) = fetch_manifest(loc).await?;
    let selected = select(&m, opts, &murl)?;
    let files = plan_files(&m, &selected, opts)?;
    let planned: BTreeSet<String> = files
        .iter()
        .map(|f| f.name.clone())
        .chain(m.files.iter().map(|f| f.file.clone()))
        .chain([HF_INDEX.to_string(), LOCAL_MANIFEST.to_string()])
        .collect();
    let earlier = claim_out(out, &m.run, &planned, opts.force)?;
    let partial = prepare_out(out)?;
    let resume = Resume::load(out, &m.run, &body, opts)?;
    let mut result = Pulled {
        out: out.display().to_string(),
        step: m.step,
        window: m.window,
        files: files.len(),
        tensors: selected.len(),
        fetched_bytes: 0,
        reused_bytes: 0,
        written_bytes: 0,
    };
    let concurrency = opts.concurrency.max(1);
    // One budget of GETs in flight across all files, so shard boundaries never drain the
    // pipeline; files finish (and are renamed and recorded) independently.
    let gets = tokio::sync::Semaphore::new(concurrency);
    let fetch = Fetch {
        loc,
        m: &m,
        gets: &gets,
        concurrency,
        progress,
    };
    let resume = std::sync::Mutex::new(resume);
    let outcomes: Vec<Result<(u64, u64, u64), CkptError>> = futures::stream::iter(
        files
            .iter()
            .map(|f| pull_file(&fetch, out, &partial, f, &resume)),
    )
    .buffer_unordered(8)
    .collect()
    .await;
    let mut bad = Vec::new();
    for o in outcomes {
        match o {
            Ok((fetched, reused, written)) => {
                result.fetched_bytes += fetched;
                result.reused_bytes += reused;
                result.written_bytes += written;
            }
            Err(CkptError::Mismatch(v)) => bad.extend(v),
            // A missing or unreadable shard: report it with the others.
            Err(e @ CkptError::Store(_)) => bad.push(e.to_string()),
            Err(e) => return Err(e),
        }
    }
    bad.sort();
    if !bad.is_empty() {
        return Err(CkptError::Mismatch(bad));
    }
    pull_small_files(loc, &m, out, &partial, &mut result).await?;
    // Before the new local manifest names this pull's files: a kill here leaves the old one,
    // naming the leftovers, so a rerun still knows them.
    let written: BTreeSet<&str> = planned.iter().map(String::as_str).collect();
    remove_stale(out, &earlier, &written)?;
    let entries: Vec<&TensorEntry> = selected.iter().map(|&i| &m.tensors[i]).collect();
    let index = m.hf_index(&entries, files.iter().map(|f| (f.name.as_str(), f.size)));
    write_replace(&partial, &inside(out, HF_INDEX)?, &index)?;
    let local = super::LocalManifest {
        manifest: m,
        source: murl,
        tensors: opts.tensors.clone(),
        tp: opts.tp,
        without_momentum: opts.without_momentum,
    };
    write_replace(
        &partial,
        &inside(out, LOCAL_MANIFEST)?,
        &serde_json::to_vec_pretty(&local).unwrap_or_default(),
    )?;
    let _ = std::fs::remove_dir(&partial);
    Ok(result)
}

/// What OUT holds before a pull, and whether the pull may write there: an empty or new
/// folder, or an earlier pull of the same run (finished, or killed and resumed), whose files
/// this pull replaces. Anything else would mix the checkpoint with files it does not know
/// (a stale `model.safetensors` beside the new shards is what a loader then reads): refused,
/// or with `force` moved into `OUT/.shardrop-displaced/`. Returns the files an earlier pull
/// of the run wrote (with their blake3 where it is known), for the pull to remove the ones
/// it does not rewrite. Names are taken from OUT's own records only when they are plain file
/// names (`safe_name`): a planted record cannot point outside OUT.
fn claim_out(
    out: &Path,
    run: &str,
    planned: &BTreeSet<String>,
    force: bool,
) -> Result<BTreeMap<String, Option<String>>, CkptError> {
    let entries = match std::fs::read_dir(out) {
        Ok(rd) => rd
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<BTreeSet<String>, _>>()
            .map_err(|e| io_err(out, e))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(io_err(out, e)),
    };
    let ours_by_name = |n: &str| super::safe_name(n) || n == HF_INDEX || n == LOCAL_MANIFEST;
    let mut earlier: BTreeMap<String, Option<String>> = BTreeMap::new();
    // A finished pull's local manifest names every file it wrote.
    if let Ok(Some(lm)) = super::LocalManifest::read(out)
        && lm.manifest.run == run
    {
        let opts = PullOptions {
            tensors: lm.tensors.clone(),
            tp: lm.tp,
            without_momentum: lm.without_momentum,
            ..PullOptions::default()
        };
        if let Ok(selected) = select(&lm.manifest, &opts, &lm.source)
            && let Ok(files) = plan_files(&lm.manifest, &selected, &opts)
        {
            for f in files {
                let hash = match f.plan {
                    Plan::Whole { shard } => lm.manifest.shards.get(shard),
                    _ => None,
                }
                .map(|s| s.blake3.clone());
                earlier.insert(f.name, hash);
            }
        }
        for f in &lm.manifest.files {
            earlier.insert(f.file.clone(), Some(f.blake3.clone()));
        }
        earlier.insert(HF_INDEX.to_string(), None);
        earlier.insert(LOCAL_MANIFEST.to_string(), None);
    }
    // A killed pull of the same run: the files it finished, and whatever this pull writes
    // anyway (its small files and index may have landed before the kill).
    let state = std::fs::read(out.join(STATE))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .filter(|v| v["run"] == run);
    if let Some(v) = state {
        if let Ok(done) = serde_json::from_value::<BTreeMap<String, String>>(v["done"].clone()) {
            for (name, hash) in done {
                earlier.insert(name, Some(hash));
            }
        }
        for name in planned {
            earlier.entry(name.clone()).or_insert(None);
        }
    }
    earlier.retain(|n, _| ours_by_name(n));
    let ours = [PARTIAL, STATE, DISPLACED];
    let foreign: Vec<&String> = entries
        .iter()
        .filter(|n| !ours.contains(&n.as_str()) && !earlier.contains_key(*n))
        .collect();
    if foreign.is_empty() {
        return Ok(earlier);
    }
    if !force {
        let shown: Vec<&str> = foreign.iter().take(5).map(|s| s.as_str()).collect();
        return Err(CkptError::Caller(format!(
            "{}: not empty and not an earlier pull of run {run} (it holds {}{}); a pull here would mix the checkpoint with those files. Pull into an empty or new folder, or pass --force to move them into {}/{DISPLACED}/ first",
            out.display(),
            shown.join(", "),
            if foreign.len() > shown.len() {
                format!(" and {} more", foreign.len() - shown.len())
            } else {
                String::new()
            },
            out.display()
        )));
    }
    for name in foreign {
        displace(out, name)?;
    }
    Ok(earlier)
}

/// Moves `OUT/name` into `OUT/.shardrop-displaced/` (a name already there gets a `.N`
/// suffix): never deleted, never mixed with a checkpoint's files.
fn displace(out: &Path, name: &str) -> Result<(), CkptError> {
    let displaced = out.join(DISPLACED);
    if std::fs::symlink_metadata(&displaced)
        .is_ok_and(|m| !m.is_dir() || m.file_type().is_symlink())
    {
        return Err(CkptError::Caller(format!(
            "{}: is a link or a file; refusing to move anything into it",
            displaced.display()
        )));
    }
    std::fs::create_dir_all(&displaced).map_err(|e| io_err(&displaced, e))?;
    let mut to = displaced.join(name);
    let mut n = 1;
    while std::fs::symlink_metadata(&to).is_ok() {
        to = displaced.join(format!("{name}.{n}"));
        n += 1;
    }
    std::fs::rename(out.join(name), &to).map_err(|e| io_err(&out.join(name), e))
}

/// Removes what an earlier pull of the run wrote and this one did not (more shards, a small
/// file the new checkpoint lacks), so OUT holds exactly one checkpoint. A file whose bytes
/// are no longer the ones that pull wrote is someone's own: moved aside, not deleted; a link
/// is unlinked, never followed.
fn remove_stale(
    out: &Path,
    earlier: &BTreeMap<String, Option<String>>,
    written: &BTreeSet<&str>,
) -> Result<(), CkptError> {
    for (name, hash) in earlier
        .iter()
        .filter(|(n, _)| !written.contains(n.as_str()))
    {
        let path = out.join(name);
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let theirs = meta.is_dir()
            || (!meta.file_type().is_symlink()
                && hash.as_ref().is_some_and(|h| {
                    std::fs::read(&path)
                        .map(|b| blake3::hash(&b).to_hex().as_str() != h)
                        .unwrap_or(true)
                }));
        if theirs {
            displace(out, name)?;
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path, e)),
        }
    }
    Ok(())
}

/// The tensors a pull takes: those the globs match, less the momentum buffers when asked.
pub(crate) fn select(
    m: &Manifest,
    opts: &PullOptions,
    murl: &str,
) -> Result<Vec<usize>, CkptError> {
    let mut selected = select_tensors(m, &opts.tensors, murl)?;
    if opts.without_momentum {
        selected.retain(|&i| !is_momentum(&m.tensors[i]));
    }
    Ok(selected)
}

fn is_momentum(t: &TensorEntry) -> bool {
    t.name.starts_with(crate::round::outer::MOMENTUM_PREFIX)
}

/// The manifest's tensors the `--tensors` globs select (all when there are none); a glob
/// that matches nothing is the caller's mistake, not an empty pull.
fn select_tensors(m: &Manifest, globs: &[String], murl: &str) -> Result<Vec<usize>, CkptError> {
    if globs.is_empty() {
        return Ok((0..m.tensors.len()).collect());
    }
    let mut b = globset::GlobSetBuilder::new();
    for g in globs {
        b.add(
            globset::Glob::new(g)
                .map_err(|e| CkptError::Caller(format!("--tensors {g:?}: {e}")))?,
        );
    }
    let set = b.build().map_err(|e| CkptError::Caller(e.to_string()))?;
    for g in globs {
        let one = globset::Glob::new(g)
            .map_err(|e| CkptError::Caller(e.to_string()))?
            .compile_matcher();
        if !m.tensors.iter().any(|t| one.is_match(&t.name)) {
            return Err(CkptError::Caller(format!(
                "--tensors {g:?} matches no tensor of {murl}"
            )));
        }
    }
    Ok((0..m.tensors.len())
        .filter(|&i| set.is_match(&m.tensors[i].name))
        .collect())
}

/// The files a pull writes: the manifest's shards as they are, or new shards holding only
/// the selected tensors (and tensor-parallel slices).
fn plan_files(
    m: &Manifest,
    selected: &[usize],
    opts: &PullOptions,
) -> Result<Vec<OutFile>, CkptError> {
    if let Some((rank, n)) = opts.tp
        && (n == 0 || rank >= n)
    {
        return Err(CkptError::Caller(format!(
            "--tp-rank {rank} --tp-size {n}: expected rank < size"
        )));
    }
    if !opts.tensors.is_empty() || opts.tp.is_some() {
        return plan_subset(m, selected, opts.tp);
    }
    // Whole shards, less those left out whole (a momentum shard without momentum); a shard
    // that mixes both (pushed before momentum had shards of its own) is cut instead.
    let wanted: BTreeSet<usize> = selected.iter().copied().collect();
    let keep: BTreeSet<usize> = selected.iter().map(|&i| m.tensors[i].shard).collect();
    if m.tensors
        .iter()
        .enumerate()
        .any(|(i, t)| keep.contains(&t.shard) && !wanted.contains(&i))
    {
        return plan_subset(m, selected, None);
    }
    Ok(m.shards
        .iter()
        .enumerate()
        .filter(|(k, _)| keep.contains(k) || !opts.without_momentum)
        .map(|(k, s)| OutFile {
            name: s.file.clone(),
            size: s.size,
            plan: Plan::Whole { shard: k },
        })
        .collect())
}

/// Creates `out` and its staging folder (never through a link); returns the staging folder.
fn prepare_out(out: &Path) -> Result<PathBuf, CkptError> {
    std::fs::create_dir_all(out).map_err(|e| io_err(out, e))?;
    let partial = out.join(PARTIAL);
    if std::fs::symlink_metadata(&partial).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(CkptError::Caller(format!(
            "{}: is a link; refusing to write through it",
            partial.display()
        )));
    }
    std::fs::create_dir_all(&partial).map_err(|e| io_err(&partial, e))?;
    Ok(partial)
}

/// The files an earlier pull into the same folder already finished, with their blake3. It
/// counts only for the same manifest and selection (its `key`).
struct Resume {
    key: String,
    /// The run pulled: a later pull of another run does not count these files as its own.
    run: String,
    done: BTreeMap<String, String>,
    path: PathBuf,
    partial: PathBuf,
}

impl Resume {
    fn load(
        out: &Path,
        run: &str,
        manifest_body: &[u8],
        opts: &PullOptions,
    ) -> Result<Resume, CkptError> {
        let key = blake3::hash(
            format!(
                "{}|{:?}|{:?}{}",
                blake3::hash(manifest_body).to_hex(),
                opts.tensors,
                opts.tp,
                // Only when given: a pull killed before the flag existed keeps its key.
                if opts.without_momentum {
                    "|without_momentum"
                } else {
                    ""
                }
            )
            .as_bytes(),
        )
        .to_hex()
        .to_string();
        let path = inside(out, STATE)?;
        let done = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .filter(|v| v["key"] == key)
            .and_then(|v| serde_json::from_value(v["done"].clone()).ok())
            .unwrap_or_default();
        Ok(Resume {
            key,
            run: run.to_string(),
            done,
            path,
            partial: out.join(PARTIAL),
        })
    }

    /// Records a finished file (by write and rename: a crash leaves the old record or the
    /// new, never half of one).
    fn record(&mut self, file: &str, blake3: String) -> Result<(), CkptError> {
        self.done.insert(file.to_string(), blake3);
        let doc = serde_json::json!({"key": self.key, "run": self.run, "done": self.done});
        write_replace(
            &self.partial,
            &self.path,
            &serde_json::to_vec(&doc).unwrap_or_default(),
        )
    }
}

/// One output file: reused when an earlier pull finished it and it still hashes right;
/// otherwise fetched into `NAME.part` (never through a link), checked, and renamed into
/// place. Returns (fetched, reused, written) bytes.
async fn pull_file(
    cx: &Fetch<'_>,
    out: &Path,
    partial: &Path,
    f: &OutFile,
    resume: &std::sync::Mutex<Resume>,
) -> Result<(u64, u64, u64), CkptError> {
    let m = cx.m;
    let final_path = inside(out, &f.name)?;
    let recorded = resume
        .lock()
        .ok()
        .and_then(|r| r.done.get(&f.name).cloned());
    if let Some(h) = recorded
        && blake3_file(&final_path).ok() == Some(h)
    {
        (cx.progress)(f.size);
        return Ok((0, f.size, 0));
    }
    let part_path = partial.join(format!("{}.part", f.name));
    let fresh = std::fs::symlink_metadata(&part_path).is_err();
    let file = Arc::new(open_nofollow(&part_path)?);
    file.set_len(f.size).map_err(|e| io_err(&part_path, e))?;
    let (fetched, reused) = match &f.plan {
        Plan::Whole { shard } => fetch_whole(cx, *shard, &file, fresh).await?,
        Plan::Subset {
            shard,
            header,
            items,
        } => {
            file.write_all_at(header, 0)
                .map_err(|e| io_err(&part_path, e))?;
            fetch_subset(cx, *shard, items, &file).await?
        }
    };
    if let Plan::Whole { shard } = f.plan {
        check_shard_header(&file, m, shard).map_err(|why| {
            CkptError::Mismatch(vec![format!(
                "{}: its safetensors header disagrees with the signed manifest: {why}",
                f.name
            )])
        })?;
    }
    drop(file);
    // A whole shard whose every chunk matched is the manifest's file; a new shard of a
    // partial pull is hashed once for the resume record.
    let h = match f.plan {
        Plan::Whole { shard } => m.shards[shard].blake3.clone(),
        Plan::Subset { .. } => blake3_file(&part_path).map_err(|e| io_err(&part_path, e))?,
    };
    std::fs::rename(&part_path, &final_path).map_err(|e| io_err(&final_path, e))?;
    if let Ok(mut r) = resume.lock() {
        r.record(&f.name, h)?;
    }
    Ok((fetched, reused, f.size))
}

/// The checkpoint's small files (configs, tokenizers), each checked whole against the
/// manifest's blake3; a file already there with the right hash is kept.
async fn pull_small_files(
    loc: &Located,
    m: &Manifest,
    out: &Path,
    partial: &Path,
    result: &mut Pulled,
) -> Result<(), CkptError> {
    for fe in &m.files {
        let p = inside(out, &fe.file)?;
        if std::fs::read(&p).is_ok_and(|b| blake3::hash(&b).to_hex().as_str() == fe.blake3) {
            result.reused_bytes += fe.size;
            continue;
        }
        let key = layout::ckpt_file(&m.run, m.step, &fe.file);
        let b = get_range(&loc.target, &key, 0..fe.size).await?;
        if blake3::hash(&b).to_hex().as_str() != fe.blake3 {
            return Err(CkptError::Mismatch(vec![format!(
                "{}: file {} does not match the manifest's blake3",
                loc.target.url_of(&loc.target.path(&key)),
                fe.file
            )]));
        }
        write_replace(partial, &p, &b)?;
        result.fetched_bytes += fe.size;
        result.written_bytes += fe.size;
    }
    Ok(())
}

/// What every fetch of one pull shares.
#[derive(Clone, Copy)]
struct Fetch<'a> {
    loc: &'a Located,
    m: &'a Manifest,
    /// GETs in flight across all files.
    gets: &'a tokio::sync::Semaphore,
    concurrency: usize,
    progress: &'a (dyn Fn(u64) + Sync),
}

/// GETs `range` of `key`, writing each piece at its offset in `file` and hashing as it
/// goes; fails (naming the object and bytes) if the body is short or the hash differs.
async fn stream_range(
    target: &Target,
    key: &str,
    range: std::ops::Range<u64>,
    file: &File,
    want: &str,
) -> Result<(), CkptError> {
    let (url, got) = open_range(target, key, range.clone()).await?;
    let mut body = got.into_stream();
    let mut hasher = blake3::Hasher::new();
    let mut off = range.start;
    while let Some(piece) = body.next().await {
        let piece = piece.map_err(|e| StoreError::from_store(&url, e))?;
        if off + piece.len() as u64 > range.end {
            return Err(CkptError::Mismatch(vec![format!(
                "{url}: bytes {}..{} came back longer than asked",
                range.start, range.end
            )]));
        }
        hasher.update(&piece);
        file.write_all_at(&piece, off).map_err(|e| CkptError::Io {
            path: format!("writing {url} bytes at {off}"),
            source: e,
        })?;
        off += piece.len() as u64;
    }
    if off != range.end {
        return Err(CkptError::Mismatch(vec![format!(
            "{url}: bytes {}..{} came back {} bytes long (truncated object?)",
            range.start,
            range.end,
            off - range.start
        )]));
    }
    if hasher.finalize().to_hex().as_str() != want {
        return Err(CkptError::Mismatch(vec![format!(
            "{url}: bytes {}..{} do not match the manifest's chunk hash",
            range.start, range.end
        )]));
    }
    Ok(())
}

/// Fetches a whole shard chunk by chunk; chunks a killed run already wrote correctly are
/// kept. Returns `(fetched, reused)` bytes.
async fn fetch_whole(
    cx: &Fetch<'_>,
    shard: usize,
    file: &Arc<File>,
    fresh: bool,
) -> Result<(u64, u64), CkptError> {
    let Fetch {
        loc,
        m,
        gets,
        concurrency,
        progress,
    } = *cx;
    let s = &m.shards[shard];
    let key = layout::ckpt_object(&m.run, m.step, &s.file);
    let url = loc.target.url_of(&loc.target.path(&key));
    let cb = m.chunk_bytes;
    let results: Vec<Result<(u64, u64), CkptError>> =
        futures::stream::iter((0..s.chunks.len()).map(|c| {
            let (file, key, url) = (Arc::clone(file), key.clone(), url.clone());
            async move {
                let range = c as u64 * cb..((c as u64 + 1) * cb).min(s.size);
                let want = s.chunks[c].clone();
                let n = range.end - range.start;
                if !fresh {
                    let (f2, w2, r2) = (Arc::clone(&file), want.clone(), range.clone());
                    let ok = tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; (r2.end - r2.start) as usize];
                        f2.read_exact_at(&mut buf, r2.start).is_ok()
                            && blake3::hash(&buf).to_hex().as_str() == w2
                    })
                    .await
                    .unwrap_or(false);
                    if ok {
                        progress(n);
                        return Ok((0, n));
                    }
                }
                // Streamed: each piece is hashed and written where it belongs as it
                // arrives (no chunk-sized buffer, no extra copy); the chunk counts only
                // once its hash matches, and the file keeps its .part name until every
                // chunk does.
                let _permit = gets
                    .acquire()
                    .await
                    .map_err(|e| CkptError::Internal(e.to_string()))?;
                stream_range(&loc.target, &key, range.clone(), &file, &want)
                    .await
                    .map_err(|e| match e {
                        CkptError::Mismatch(_) | CkptError::Store(_) => e,
                        other => CkptError::Mismatch(vec![format!("{url}: chunk {c}: {other}")]),
                    })?;
                progress(n);
                Ok((n, 0))
            }
        }))
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut totals = (0, 0);
    let mut bad = Vec::new();
    for r in results {
        match r {
            Ok((f, u)) => {
                totals.0 += f;
                totals.1 += u;
            }
            Err(CkptError::Mismatch(v)) => bad.extend(v),
            Err(e) => return Err(e),
        }
    }
    if !bad.is_empty() {
        bad.sort();
        bad.truncate(8);
        return Err(CkptError::Mismatch(bad));
    }
    Ok(totals)
}

/// Fetches the selected tensors of one shard, each verified against its tensor hash, then
/// cut (tensor parallelism) and written at its place in the new shard.
async fn fetch_subset(
    cx: &Fetch<'_>,
    shard: usize,
    items: &[Item],
    file: &Arc<File>,
) -> Result<(u64, u64), CkptError> {
    let Fetch {
        loc,
        m,
        gets,
        concurrency,
        progress,
    } = *cx;
    let key = layout::ckpt_object(&m.run, m.step, &m.shards[shard].file);
    let url = loc.target.url_of(&loc.target.path(&key));
    let fetch_pieces = |pieces: Vec<std::ops::Range<u64>>| {
        let key = &key;
        async move {
            let parts: Vec<Result<bytes::Bytes, CkptError>> =
                futures::stream::iter(pieces.into_iter().map(|r| async move {
                    let _permit = gets
                        .acquire()
                        .await
                        .map_err(|e| CkptError::Internal(e.to_string()))?;
                    get_range(&loc.target, key, r).await
                }))
                .buffered(concurrency)
                .collect()
                .await;
            parts.into_iter().collect::<Result<Vec<_>, _>>()
        }
    };
    let shard_entry = &m.shards[shard];
    let mut fetched = 0;
    for it in items {
        let t = &m.tensors[it.tensor];
        let es = dtype_size(&t.dtype).unwrap_or(1);
        let cb = m.chunk_bytes;
        // A dimension-0 cut is one contiguous run of rows: when the chunks covering it are
        // fewer bytes than the whole tensor, fetch only those, each checked against its chunk
        // hash, and keep the rows.
        let rows = match it.cut {
            Some((0, start, part)) => {
                let row = t.shape[1] * es;
                let (lo, hi) = (t.begin + start * row, t.begin + (start + part) * row);
                let (c0, c1) = (lo / cb, (hi.max(lo + 1) - 1) / cb);
                ((c1 - c0 + 1) * cb < t.end - t.begin).then_some((lo, hi, c0, c1))
            }
            _ => None,
        };
        let bytes: Vec<u8> = if let Some((lo, hi, c0, c1)) = rows {
            let pieces: Vec<std::ops::Range<u64>> = (c0..=c1)
                .map(|c| c * cb..((c + 1) * cb).min(shard_entry.size))
                .collect();
            let got = fetch_pieces(pieces).await?;
            let mut data = Vec::with_capacity(((c1 - c0 + 1) * cb) as usize);
            for (c, b) in (c0..=c1).zip(&got) {
                progress(b.len() as u64);
                if shard_entry.chunks.get(c as usize).map(String::as_str)
                    != Some(blake3::hash(b).to_hex().as_str())
                {
                    return Err(CkptError::Mismatch(vec![format!(
                        "{url}: chunk {c} (holding rows of tensor {}) does not match the manifest",
                        t.name
                    )]));
                }
                data.extend_from_slice(b);
            }
            fetched += data.len() as u64;
            let off = (lo - c0 * cb) as usize;
            data[off..off + (hi - lo) as usize].to_vec()
        } else {
            // Whole tensors (to keep, or to cut along dimension 1) in parallel chunk-sized
            // ranges, checked against the tensor hash.
            let pieces: Vec<std::ops::Range<u64>> = (t.begin..t.end)
                .step_by(cb as usize)
                .map(|a| a..(a + cb).min(t.end))
                .collect();
            let mut data = Vec::with_capacity((t.end - t.begin) as usize);
            for b in fetch_pieces(pieces).await? {
                progress(b.len() as u64);
                data.extend_from_slice(&b);
            }
            fetched += data.len() as u64;
            if blake3::hash(&data).to_hex().as_str() != t.blake3 {
                return Err(CkptError::Mismatch(vec![format!(
                    "{url}: tensor {} (bytes {}..{}) does not match the manifest",
                    t.name, t.begin, t.end
                )]));
            }
            match it.cut {
                None => data,
                Some((0, start, part)) => {
                    let row = t.shape[1] * es;
                    data[(start * row) as usize..((start + part) * row) as usize].to_vec()
                }
                Some((_, start, part)) => {
                    let row = t.shape[1] * es;
                    let (a, n) = ((start * es) as usize, (part * es) as usize);
                    data.chunks_exact(row as usize)
                        .flat_map(|r| r[a..a + n].iter().copied())
                        .collect()
                }
            }
        };
        if bytes.len() as u64 != it.len {
            return Err(CkptError::Internal(format!(
                "tensor {}: cut to the wrong size",
                t.name
            )));
        }
        file.write_all_at(&bytes, it.dst)
            .map_err(|e| CkptError::Io {
                path: format!("writing tensor {}", t.name),
                source: e,
            })?;
    }
    Ok((fetched, 0))
}
