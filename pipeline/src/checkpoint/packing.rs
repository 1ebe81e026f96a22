//! Reading a push's sources and (re)packing their tensors into shards without copying them:
//! a shard is a header plus byte ranges of the source files, read on demand by the upload.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{CHUNK, CkptError, HF_INDEX, LOCAL_MANIFEST, dtype_size, io_err, safe_name};
use crate::store::PutSource;

/// Small files of a model folder that travel with the checkpoint (config, tokenizer…).
const MAX_EXTRA_FILE: u64 = 64 << 20;
/// A safetensors header larger than this is refused (safetensors' own cap).
const MAX_HEADER: u64 = 100 << 20;

pub(crate) struct SrcTensor {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    pub file: usize,
    pub offset: u64,
    pub len: u64,
}

pub(crate) struct Inventory {
    pub files: Vec<(PathBuf, File)>,
    pub tensors: Vec<SrcTensor>,
    pub extras: Vec<(String, PathBuf)>,
}

/// The tensors of one safetensors file, in data order, with absolute offsets.
pub(crate) fn read_header(path: &Path, f: &File, fi: usize) -> Result<Vec<SrcTensor>, CkptError> {
    let bad = |m: String| CkptError::Caller(format!("{}: {m}", path.display()));
    let file_len = f.metadata().map_err(|e| io_err(path, e))?.len();
    let mut n8 = [0u8; 8];
    f.read_exact_at(&mut n8, 0)
        .map_err(|_| bad("not a safetensors file (shorter than 8 bytes)".into()))?;
    let n = u64::from_le_bytes(n8);
    if n > MAX_HEADER || 8 + n > file_len {
        return Err(bad(format!("header length {n} does not fit the file")));
    }
    let mut h = vec![0u8; n as usize];
    f.read_exact_at(&mut h, 8).map_err(|e| io_err(path, e))?;
    let v: serde_json::Value =
        serde_json::from_slice(&h).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("header is not an object".into()))?;
    let data = 8 + n;
    let mut out = Vec::new();
    for (name, t) in obj {
        if name == "__metadata__" {
            continue;
        }
        let dtype = t["dtype"].as_str().unwrap_or_default().to_string();
        let es =
            dtype_size(&dtype).ok_or_else(|| bad(format!("tensor {name}: dtype {dtype:?}")))?;
        let shape: Vec<u64> = t["shape"]
            .as_array()
            .map(|a| a.iter().filter_map(|d| d.as_u64()).collect())
            .ok_or_else(|| bad(format!("tensor {name}: no shape")))?;
        let offs: Vec<u64> = t["data_offsets"]
            .as_array()
            .map(|a| a.iter().filter_map(|d| d.as_u64()).collect())
            .unwrap_or_default();
        let [b, e] = offs[..] else {
            return Err(bad(format!("tensor {name}: data_offsets")));
        };
        let want = shape.iter().try_fold(es, |a, &d| a.checked_mul(d));
        if b > e || data + e > file_len || want != Some(e - b) {
            return Err(bad(format!(
                "tensor {name}: bytes {b}..{e} do not match its dtype and shape or run past the file"
            )));
        }
        out.push(SrcTensor {
            name: name.clone(),
            dtype,
            shape,
            file: fi,
            offset: data + b,
            len: e - b,
        });
    }
    out.sort_by_key(|t| t.offset);
    Ok(out)
}

/// SRC: safetensors files, or one Hugging Face model folder (its `*.safetensors` and its
/// small files; the index is regenerated).
pub(crate) fn inventory(srcs: &[PathBuf]) -> Result<Inventory, CkptError> {
    let mut st_files = Vec::new();
    let mut extras = Vec::new();
    for src in srcs {
        let meta = std::fs::metadata(src).map_err(|e| io_err(src, e))?;
        if meta.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(src)
                .map_err(|e| io_err(src, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            entries.sort();
            for p in entries {
                let name = p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("")
                    .to_string();
                let m = std::fs::metadata(&p).map_err(|e| io_err(&p, e))?;
                if !m.is_file()
                    || name.starts_with('.')
                    || name == HF_INDEX
                    || name == LOCAL_MANIFEST
                {
                    continue;
                }
                if name.ends_with(".safetensors") {
                    st_files.push(p);
                } else if safe_name(&name) && m.len() <= MAX_EXTRA_FILE {
                    extras.push((name, p));
                } else {
                    tracing::warn!(file = %p.display(), "not pushed: a name or size a checkpoint cannot carry");
                }
            }
        } else {
            st_files.push(src.clone());
        }
    }
    if st_files.is_empty() {
        return Err(CkptError::Caller("no safetensors file to push".into()));
    }
    let mut files = Vec::new();
    let mut tensors: Vec<SrcTensor> = Vec::new();
    for (i, p) in st_files.into_iter().enumerate() {
        let f = File::open(&p).map_err(|e| io_err(&p, e))?;
        tensors.extend(read_header(&p, &f, i)?);
        files.push((p, f));
    }
    let mut seen = std::collections::HashSet::new();
    for t in &tensors {
        if !seen.insert(t.name.as_str()) {
            return Err(CkptError::Caller(format!(
                "tensor {:?} appears in more than one source file",
                t.name
            )));
        }
    }
    Ok(Inventory {
        files,
        tensors,
        extras,
    })
}

/// One shard to write: its safetensors header and where each tensor's bytes come from.
pub(crate) struct PlannedShard {
    pub file: String,
    pub header: Vec<u8>,
    /// `(tensor index, absolute begin, absolute end)` in the shard.
    pub tensors: Vec<(usize, u64, u64)>,
    pub size: u64,
}

/// A safetensors header for tensors laid out back to back in this order, padded so the
/// data starts 8-aligned, with `format: pt` metadata (transformers requires it). Returns
/// the header and each tensor's absolute begin offset.
pub(crate) fn st_header(entries: &[(&str, &str, &[u64], u64)]) -> (Vec<u8>, Vec<u64>) {
    let mut obj = serde_json::Map::new();
    obj.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut off = 0u64;
    let mut rel = Vec::with_capacity(entries.len());
    for (name, dtype, shape, len) in entries {
        obj.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [off, off + len]}),
        );
        rel.push(off);
        off += len;
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(obj)).unwrap_or_default();
    while !(8 + h.len()).is_multiple_of(8) {
        h.push(b' ');
    }
    let mut header = (h.len() as u64).to_le_bytes().to_vec();
    header.extend_from_slice(&h);
    let base = header.len() as u64;
    (header, rel.into_iter().map(|r| base + r).collect())
}

fn shard_header(inv: &Inventory, members: &[usize]) -> (Vec<u8>, Vec<(usize, u64, u64)>) {
    let entries: Vec<(&str, &str, &[u64], u64)> = members
        .iter()
        .map(|&i| {
            let t = &inv.tensors[i];
            (t.name.as_str(), t.dtype.as_str(), t.shape.as_slice(), t.len)
        })
        .collect();
    let (header, begins) = st_header(&entries);
    let placed = members
        .iter()
        .zip(begins)
        .map(|(&i, b)| (i, b, b + inv.tensors[i].len))
        .collect();
    (header, placed)
}

/// Greedy packing in source order: a new shard starts when the next tensor would take the
/// current one past `shard_size` (a tensor larger than that gets a shard of its own). The
/// model's tensors go into `<nnnnn>.safetensors`, the outer optimizer's momentum buffers
/// (`MOMENTUM_PREFIX`) into their own `momentum-<nnnnn>.safetensors` after them: a loader of
/// the model (transformers, `load_state_dict(strict=True)`) then never meets a buffer, and the
/// buffers stay sharded (a 72 B model's f32 momentum is 288 GB, 135 shards of 2 GiB).
pub(crate) fn plan(inv: &Inventory, shard_size: u64) -> Vec<PlannedShard> {
    let is_momentum = |t: &SrcTensor| t.name.starts_with(crate::round::outer::MOMENTUM_PREFIX);
    let mut out = Vec::new();
    for (prefix, momentum) in [("", false), (MOMENTUM_SHARD_PREFIX, true)] {
        let members: Vec<usize> = (0..inv.tensors.len())
            .filter(|&i| is_momentum(&inv.tensors[i]) == momentum)
            .collect();
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut acc = 0u64;
        for i in members {
            let len = inv.tensors[i].len;
            match groups.last_mut() {
                Some(g) if acc + len <= shard_size => g.push(i),
                _ => {
                    groups.push(vec![i]);
                    acc = 0;
                }
            }
            acc += len;
        }
        // A checkpoint always has a model shard, even of no tensor (an empty model).
        if groups.is_empty() && !momentum {
            groups.push(Vec::new());
        }
        out.extend(groups.iter().enumerate().map(|(k, members)| {
            let (header, tensors) = shard_header(inv, members);
            let size = tensors.last().map_or(header.len() as u64, |t| t.2);
            PlannedShard {
                file: format!("{prefix}{k:05}.safetensors"),
                header,
                tensors,
                size,
            }
        }));
    }
    out
}

/// Name prefix of the shards that hold the outer optimizer's momentum buffers.
pub(crate) const MOMENTUM_SHARD_PREFIX: &str = "momentum-";

/// A planned shard as an upload source: reads come from the header or the source files.
pub(crate) struct ShardSource<'a> {
    pub inv: &'a Inventory,
    pub shard: &'a PlannedShard,
    /// Called with every byte count read (upload progress).
    pub progress: &'a (dyn Fn(u64) + Sync),
}

impl PutSource for ShardSource<'_> {
    fn len(&self) -> u64 {
        self.shard.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let mut pos = offset;
        let mut done = 0usize;
        let hl = self.shard.header.len() as u64;
        while done < buf.len() {
            let out = &mut buf[done..];
            let n = if pos < hl {
                let h = &self.shard.header[pos as usize..];
                let n = h.len().min(out.len());
                out[..n].copy_from_slice(&h[..n]);
                n
            } else {
                let k = self
                    .shard
                    .tensors
                    .partition_point(|&(_, _, end)| end <= pos);
                let Some(&(ti, b, e)) = self.shard.tensors.get(k) else {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "read past the shard",
                    ));
                };
                let t = &self.inv.tensors[ti];
                let n = ((e - pos) as usize).min(out.len());
                self.inv.files[t.file]
                    .1
                    .read_exact_at(&mut out[..n], t.offset + (pos - b))?;
                n
            };
            done += n;
            pos += n as u64;
        }
        (self.progress)(buf.len() as u64);
        Ok(())
    }
}

/// What hashing a planned shard gives: its blake3, its chunk hashes and each tensor's.
pub(crate) struct ShardHashes {
    pub blake3: String,
    pub chunks: Vec<String>,
    pub tensors: Vec<String>,
}

/// One pass over the shard's bytes in `CHUNK` blocks, feeding the three hashers.
pub(crate) fn hash_shard(src: &ShardSource) -> std::io::Result<ShardHashes> {
    let size = src.len();
    let mut whole = blake3::Hasher::new();
    let mut chunks = Vec::with_capacity(size.div_ceil(CHUNK) as usize);
    let mut tensor_h: Vec<blake3::Hasher> = vec![blake3::Hasher::new(); src.shard.tensors.len()];
    let mut buf = vec![0u8; CHUNK as usize];
    let mut off = 0u64;
    let quiet = |_: u64| {};
    let reader = ShardSource {
        progress: &quiet,
        ..*src
    };
    while off < size {
        let n = (size - off).min(CHUNK) as usize;
        reader.read_at(off, &mut buf[..n])?;
        let block = &buf[..n];
        whole.update(block);
        chunks.push(blake3::hash(block).to_hex().to_string());
        for (k, &(_, b, e)) in src.shard.tensors.iter().enumerate() {
            let (lo, hi) = (b.max(off), e.min(off + n as u64));
            if lo < hi {
                tensor_h[k].update(&block[(lo - off) as usize..(hi - off) as usize]);
            }
        }
        off += n as u64;
    }
    Ok(ShardHashes {
        blake3: whole.finalize().to_hex().to_string(),
        chunks,
        tensors: tensor_h
            .iter()
            .map(|h| h.finalize().to_hex().to_string())
            .collect(),
    })
}
