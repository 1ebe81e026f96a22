use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use shardrop::identity::Identity;

use super::Ctx;
use crate::out;

#[derive(Args)]
pub struct KeygenArgs {
    /// Where to write the secret key (refuses to overwrite).
    #[arg(long)]
    out: PathBuf,
}

pub fn keygen(ctx: &Ctx, a: KeygenArgs) -> anyhow::Result<()> {
    let id = Identity::generate();
    id.save_new(&a.out).context("keygen")?;
    let peer = id.peer_id().to_string();
    // Text: the peer id alone on stdout (PEER=$(shardrop keygen --out k.key)), the note on
    // stderr.
    out::emit(
        ctx,
        &serde_json::json!({"peer_id": peer, "key_file": a.out.display().to_string()}),
        &peer,
    );
    if !ctx.json {
        eprintln!("(secret key written to {}, mode 0600)", a.out.display());
    }
    Ok(())
}

/// Loads a key file for a command, naming the file and the fix on failure.
pub fn load(path: &std::path::Path) -> anyhow::Result<Identity> {
    Ok(Identity::load(path)?)
}
