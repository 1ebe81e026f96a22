//! sign, verify, inspect, get: the envelope as a user handles it.

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use shardrop::format::envelope::{
    self, Compression, EnvelopeBuilder, Expect, Head, Kind, Limits, PREFIX_LEN, RemoteEnvelope,
    fetch_head, parse_prefix, read_sections, verify_sections,
};
use shardrop::identity::PeerId;
use shardrop::store::{self, PutOutcome};

use super::{Ctx, keys};
use crate::out;

fn parse_kind(s: &str) -> Result<Kind, String> {
    Kind::parse(s).ok_or_else(|| {
        let all: Vec<_> = Kind::ALL.iter().map(|k| k.name()).collect();
        format!("unknown kind {s:?} (one of {})", all.join(", "))
    })
}

fn parse_peer(s: &str) -> Result<PeerId, String> {
    PeerId::parse(s).map_err(|e| e.to_string())
}

#[derive(Args)]
pub struct SignArgs {
    /// Secret key file of the signer.
    #[arg(long)]
    key: PathBuf,
    /// The envelope kind: gradient, aggregate, ledger, registry, scores, weights, manifest,
    /// pointer (`schemas/envelope.md`).
    #[arg(long, value_parser = parse_kind)]
    kind: Kind,
    /// The run name recorded in the signed header.
    #[arg(long)]
    run: String,
    /// The window recorded in the signed header.
    #[arg(long)]
    window: Option<u64>,
    /// The step recorded in the signed header.
    #[arg(long)]
    step: Option<u64>,
    /// Section compression.
    #[arg(long, default_value = "zstd", value_parser = ["zstd", "none"])]
    compression: String,
    /// zstd level.
    #[arg(long, default_value_t = 3)]
    level: i32,
    /// Pin the recorded signer clock (ms since the Unix epoch) so that a re-run produces
    /// identical bytes and its create-only put succeeds as a retry.
    #[arg(long)]
    clock_ms: Option<u64>,
    /// Extra signed metadata, KEY=VALUE (repeatable).
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    meta: Vec<String>,
    /// The codec the sections are in (`topk-v1` for a gradient shard), recorded in the
    /// signed header with its `--codec-param`s.
    #[arg(long)]
    codec: Option<String>,
    /// A codec parameter, KEY=VALUE (repeatable), signed with --codec.
    #[arg(long = "codec-param", value_name = "KEY=VALUE", requires = "codec")]
    codec_params: Vec<String>,
    /// Files; each becomes one section named after the file.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Object URL to put the envelope at (create-only).
    #[arg(long)]
    to: String,
}

pub async fn sign(ctx: &Ctx, a: SignArgs) -> anyhow::Result<()> {
    let id = keys::load(&a.key)?;
    let (target, path) = store::open_object(&a.to, &ctx.s3)?;
    let compression = match a.compression.as_str() {
        "none" => Compression::None,
        _ => Compression::Zstd,
    };
    let mut b = EnvelopeBuilder::new(a.kind, &a.run).level(a.level);
    if let Some(w) = a.window {
        b = b.window(w);
    }
    if let Some(s) = a.step {
        b = b.step(s);
    }
    if let Some(ms) = a.clock_ms {
        b = b.clock_ms(ms);
    }
    for kv in &a.meta {
        let Some((k, v)) = kv.split_once('=') else {
            return Err(crate::out::usage(format!(
                "--meta {kv:?}: expected KEY=VALUE"
            )));
        };
        b = b.meta(k, v);
    }
    if let Some(codec) = &a.codec {
        let mut params = std::collections::BTreeMap::new();
        for kv in &a.codec_params {
            let Some((k, v)) = kv.split_once('=') else {
                return Err(crate::out::usage(format!(
                    "--codec-param {kv:?}: expected KEY=VALUE"
                )));
            };
            params.insert(k.to_string(), v.to_string());
        }
        b = b.codec(codec, params);
    }
    for input in &a.inputs {
        let name = input
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{}: no usable file name", input.display()))?;
        if !envelope::is_ident(name) {
            bail!(
                "{}: section names are [A-Za-z0-9._-] and may not start with '.'; rename the file",
                input.display()
            );
        }
        b = b.section_file(name, input, compression, None)?;
    }
    let signed = tokio::task::spawn_blocking(move || b.sign(&id)).await??;
    let total = signed.len();
    let outcome = store::put_create(&target, &path, &signed).await?;
    let object = target.url_of(&path);
    let sections: Vec<_> = signed
        .header
        .sections
        .iter()
        .map(|s| serde_json::json!({"name": s.name, "len": s.len, "raw_len": s.raw_len, "hash": s.hash}))
        .collect();
    let outcome_name = match outcome {
        PutOutcome::Created => "created",
        PutOutcome::AlreadyIdentical => "already_identical",
    };
    let json = serde_json::json!({
        "object": object, "bytes": total, "raw_bytes": signed.header.raw_len,
        "signer": signed.header.signer, "kind": signed.header.kind, "run": signed.header.run,
        "window": signed.header.window, "step": signed.header.step,
        "sections": sections, "outcome": outcome_name,
    });
    let text = format!(
        "{object}: {outcome_name}, {total} bytes ({} raw) in {} sections, signed by {}",
        signed.header.raw_len,
        signed.header.sections.len(),
        signed.header.signer
    );
    out::emit(ctx, &json, &text);
    Ok(())
}

/// What the reader insists on; every flag left out is not checked.
#[derive(Args, Clone)]
pub struct ExpectArgs {
    /// Require this signer (peer id, hex).
    #[arg(long, value_parser = parse_peer)]
    signer: Option<PeerId>,
    /// Require this run in the signed header.
    #[arg(long)]
    run: Option<String>,
    /// Require this window in the signed header.
    #[arg(long)]
    window: Option<u64>,
    /// Require this step in the signed header.
    #[arg(long)]
    step: Option<u64>,
    /// The envelope kind: gradient, aggregate, ledger, registry, scores, weights, manifest,
    /// pointer (`schemas/envelope.md`).
    #[arg(long, value_parser = parse_kind)]
    kind: Option<Kind>,
}

impl ExpectArgs {
    fn expect(&self) -> Expect {
        Expect {
            signer: self.signer,
            run: self.run.clone(),
            kind: self.kind,
            window: self.window,
            step: self.step,
        }
    }
}

#[derive(Args)]
pub struct VerifyArgs {
    /// Object URL.
    url: String,
    #[command(flatten)]
    expect: ExpectArgs,
}

fn summary(env: &RemoteEnvelope) -> serde_json::Value {
    let h = &env.head.header;
    serde_json::json!({
        "ok": true, "valid": true, "object": env.object, "kind": h.kind, "run": h.run,
        "window": h.window, "step": h.step, "signer": env.signer.to_string(),
        "bytes": env.meta.size, "raw_bytes": h.raw_len, "sections": h.sections.len(),
        "last_modified": env.meta.last_modified.to_rfc3339(),
        "signer_clock_ms": h.clock_ms, "codec": h.codec,
    })
}

/// Opens an object URL and verifies its head (signature, expectations, size): the first
/// step of every command that reads an envelope.
pub async fn open_verified(
    ctx: &Ctx,
    url: &str,
    expect: &Expect,
) -> anyhow::Result<(store::Target, RemoteEnvelope)> {
    let (target, path) = store::open_object(url, &ctx.s3)?;
    let object = target.url_of(&path);
    let env = RemoteEnvelope::open(
        target.store.as_ref(),
        &path,
        &object,
        &Limits::default(),
        expect,
    )
    .await?;
    Ok((target, env))
}

pub async fn verify(ctx: &Ctx, a: VerifyArgs) -> anyhow::Result<()> {
    let limits = Limits::default();
    // A mutable object (LATEST, a registry) replaced mid-verification is read again; only
    // a failure of one unchanged version is a verdict.
    let mut attempt = 0;
    let env = loop {
        attempt += 1;
        let (target, env) = open_verified(ctx, &a.url, &a.expect.expect()).await?;
        let bar = out::bytes_bar(ctx, env.head.header.body_len, "verifying");
        let r = verify_sections(target.store.as_ref(), &env, &limits, &|n| bar.inc(n)).await;
        bar.finish_and_clear();
        match r {
            Ok(()) => break env,
            Err(e) if attempt < 5 => {
                let torn = matches!(e, envelope::EnvelopeError::Changed { .. })
                    || (e.rejection().is_some()
                        && envelope::replaced(target.store.as_ref(), &env).await);
                if !torn {
                    return Err(e.into());
                }
            }
            Err(e) => return Err(e.into()),
        }
    };
    let h = &env.head.header;
    let text = format!(
        "{}: valid {} (run {}, {}), signed by {}, {} bytes, {} sections",
        env.object,
        h.kind,
        h.run,
        h.window
            .map(|w| format!("window {w}"))
            .or(h.step.map(|s| format!("step {s}")))
            .unwrap_or_else(|| "no window".into()),
        env.signer,
        env.meta.size,
        h.sections.len()
    );
    out::emit(ctx, &summary(&env), &text);
    Ok(())
}

#[derive(Args)]
pub struct InspectArgs {
    /// Object URL.
    url: String,
    /// Also fetch and verify every section.
    #[arg(long)]
    deep: bool,
}

pub async fn inspect(ctx: &Ctx, a: InspectArgs) -> anyhow::Result<()> {
    let (target, path) = store::open_object(&a.url, &ctx.s3)?;
    let limits = Limits::default();
    let object = target.url_of(&path);
    let (meta, bytes) = fetch_head(target.store.as_ref(), &path, &object, &limits).await?;
    let mut json = serde_json::json!({
        "object": object, "bytes": meta.size,
        "last_modified": meta.last_modified.to_rfc3339(), "etag": meta.e_tag,
    });
    let mut text = format!(
        "object        {object}\nsize          {} bytes\nlast_modified {}\n",
        meta.size,
        meta.last_modified.to_rfc3339()
    );
    let mut problem: Option<envelope::Rejection> = None;
    match parse_prefix(
        &bytes,
        &Limits {
            max_header_len: u32::MAX,
            ..limits.clone()
        },
    ) {
        Ok((version, kind, header_len)) => {
            json["prefix"] = serde_json::json!({"version": version, "kind": kind.name(), "header_len": header_len});
            text += &format!(
                "prefix        SHARDROP v{version}, kind {kind}, header {header_len} bytes\n"
            );
            let end = (PREFIX_LEN + header_len as usize).min(bytes.len());
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes[PREFIX_LEN..end]) {
                text += &header_text(&v);
                json["header"] = v;
            }
        }
        Err(r) => problem = Some(r),
    }
    let mut head_ok: Option<(Head, PeerId)> = None;
    if problem.is_none() {
        match Head::parse(&bytes, &limits)
            .and_then(|h| h.verify(meta.size, &Expect::default()).map(|s| (h, s)))
        {
            Ok(hs) => head_ok = Some(hs),
            Err(r) => problem = Some(r),
        }
    }
    if let (Some((head, signer)), true) = (&head_ok, a.deep) {
        let env = RemoteEnvelope {
            object: object.clone(),
            path: path.clone(),
            meta: meta.clone(),
            head: head.clone(),
            signer: *signer,
        };
        if let Err(e) = verify_sections(target.store.as_ref(), &env, &limits, &|_| {}).await {
            match e.rejection() {
                Some(r) => problem = Some(r.clone()),
                None => return Err(e.into()),
            }
        }
    }
    let checked = if a.deep {
        "signature, sizes and sections"
    } else {
        "signature and sizes (sections not fetched; --deep)"
    };
    match &problem {
        None => {
            text += &format!("verdict       valid: {checked}\n");
            json["valid"] = true.into();
        }
        Some(r) => {
            text += &format!("verdict       INVALID ({}): {}\n", r.reason, r.detail);
            json["valid"] = false.into();
            json["problem"] = serde_json::json!({"reason": r.reason.code(), "detail": r.detail});
        }
    }
    json["deep"] = a.deep.into();
    out::emit(ctx, &json, &text);
    Ok(())
}

fn header_text(v: &serde_json::Value) -> String {
    let mut t = String::new();
    if let Some(obj) = v.as_object() {
        for (k, val) in obj {
            if k != "sections" {
                t += &format!("{k:<14}{val}\n");
            }
        }
    }
    if let Some(sections) = v.get("sections").and_then(|s| s.as_array()) {
        t += &format!(
            "sections      {}\n  {:<24} {:>12} {:>12} {:>12} {:<5} hash\n",
            sections.len(),
            "name",
            "offset",
            "len",
            "raw_len",
            "comp"
        );
        for s in sections {
            let g = |k: &str| {
                s.get(k)
                    .map(|v| v.to_string().trim_matches('"').to_string())
                    .unwrap_or_default()
            };
            t += &format!(
                "  {:<24} {:>12} {:>12} {:>12} {:<5} {}\n",
                g("name"),
                g("offset"),
                g("len"),
                g("raw_len"),
                g("compression"),
                g("hash")
            );
        }
    }
    t
}

/// A refusal of `object` for declaring more than the caller allows (exit 3, `over_limit`).
pub fn over_limit(object: &str, detail: String) -> anyhow::Error {
    envelope::EnvelopeError::Rejected {
        object: object.to_string(),
        rejection: envelope::Rejection::new(envelope::Reason::OverLimit, detail),
    }
    .into()
}

#[derive(Args)]
pub struct GetArgs {
    /// Object URL.
    url: String,
    /// Folder to write the decompressed sections into (created if missing).
    out_dir: PathBuf,
    /// Fetch only this section (one ranged GET).
    #[arg(long)]
    section: Option<String>,
    /// Refuse (before writing anything) an object whose selected sections declare more
    /// decompressed bytes than this, or more than the disk has free.
    #[arg(long, default_value = "256MiB", value_parser = super::parse_size)]
    max_bytes: u64,
    #[command(flatten)]
    expect: ExpectArgs,
}

pub async fn get(ctx: &Ctx, a: GetArgs) -> anyhow::Result<()> {
    let (target, env) = open_verified(ctx, &a.url, &a.expect.expect()).await?;
    let limits = Limits::default();
    let object = env.object.clone();
    let selected: Vec<usize> = match &a.section {
        None => (0..env.sections().len()).collect(),
        Some(name) => match env.sections().iter().position(|s| &s.name == name) {
            Some(i) => vec![i],
            None => bail!("{object}: no section named {name:?}"),
        },
    };
    let raw: u64 = selected.iter().map(|&i| env.sections()[i].raw_len).sum();
    if raw > a.max_bytes {
        return Err(over_limit(
            &object,
            format!(
                "the sections declare {raw} decompressed bytes, over --max-bytes {}",
                a.max_bytes
            ),
        ));
    }
    std::fs::create_dir_all(&a.out_dir)
        .with_context(|| format!("{}: cannot create", a.out_dir.display()))?;
    if let Some(free) = super::free_bytes(&a.out_dir)
        && raw > free
    {
        bail!(
            "{object}: refused: the sections declare {raw} decompressed bytes, {} has {free} free",
            a.out_dir.display()
        );
    }
    // Sections land in a hidden folder inside OUT_DIR and move into place only when every
    // one verified; on any failure the folder (and all it holds) is removed on drop.
    let staging = tempfile::Builder::new()
        .prefix(".shardrop-partial-")
        .tempdir_in(&a.out_dir)
        .with_context(|| format!("{}: cannot create a staging folder", a.out_dir.display()))?;
    let total: u64 = selected.iter().map(|&i| env.sections()[i].len).sum();
    let bar = out::bytes_bar(ctx, total, "fetching");
    let staging_path = staging.path().to_path_buf();
    let sinks = read_sections(
        target.store.as_ref(),
        &env,
        &selected,
        &limits,
        |entry| {
            Ok(BufWriter::with_capacity(
                1 << 20,
                std::fs::File::create(staging_path.join(&entry.name))?,
            ))
        },
        &|n| bar.inc(n),
    )
    .await?;
    bar.finish_and_clear();
    for mut sink in sinks {
        sink.flush()
            .with_context(|| format!("{}: write failed", a.out_dir.display()))?;
    }
    let mut written = Vec::new();
    for &i in &selected {
        let entry = &env.sections()[i];
        let dest = a.out_dir.join(&entry.name);
        std::fs::rename(staging_path.join(&entry.name), &dest)
            .with_context(|| format!("{}: cannot move into place", dest.display()))?;
        written.push(serde_json::json!({"name": entry.name, "path": dest.display().to_string(), "bytes": entry.raw_len}));
    }
    drop(staging);
    let mut json = summary(&env);
    json["written"] = serde_json::Value::Array(written.clone());
    let text = format!(
        "{object}: verified; wrote {} section(s) to {}",
        written.len(),
        a.out_dir.display()
    );
    out::emit(ctx, &json, &text);
    Ok(())
}
