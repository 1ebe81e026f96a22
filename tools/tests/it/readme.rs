//! The README's "Running the roles against a real bucket" block, run as written (#31): the
//! shell block is taken from README.md itself, so the README cannot drift from the code. The
//! test defines only what the text asks the reader to have: `shardrop` on PATH, the S3
//! credentials (here the local S3 server's, also as `MINER7_AWS_*`), `model.safetensors`,
//! `update.safetensors`, `eval.py` (the tested example it names) and an `aws` for `aws s3 mb`
//! (a few lines of boto3: no AWS CLI here).

use std::path::Path;
use std::process::Command;

use crate::common::{self, tensors, write_update};

/// The first ```sh block after the heading.
fn readme_block(heading: &str) -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let from = readme.find(heading).expect("the README has the section");
    let rest = &readme[from..];
    let start = rest.find("```sh\n").expect("a sh block") + 6;
    let len = rest[start..].find("```").expect("the block ends");
    rest[start..start + len].to_string()
}

/// `aws s3 mb s3://B`: creates the bucket on the endpoint of `AWS_ENDPOINT_URL`. A bucket
/// left by an earlier run of this test is emptied first, so the run starts from nothing.
const AWS_SHIM: &str = r#"import os, sys
import boto3
assert sys.argv[1:3] == ["s3", "mb"] and sys.argv[3].startswith("s3://"), sys.argv
name = sys.argv[3][5:]
s3 = boto3.resource("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"],
                    region_name=os.environ.get("AWS_REGION", "us-east-1"))
b = s3.Bucket(name)
try:
    b.create()
except Exception as e:
    if "BucketAlreadyOwnedByYou" not in str(e) and "BucketAlreadyExists" not in str(e):
        raise
    b.objects.all().delete()
print(f"make_bucket: {name}")
"#;

#[test]
fn the_readme_roles_block_runs_as_written_against_the_local_s3_server() {
    if common::s3_base("readme", "roles").is_none() {
        return;
    }
    let python = std::env::var("SHARDROP_PYTHON").expect("SHARDROP_PYTHON (tools/test sets it)");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    // What the text asks for: shardrop, python (eval.py's) and aws on PATH.
    let shardrop = Path::new(env!("CARGO_BIN_EXE_shardrop"));
    std::os::unix::fs::symlink(shardrop, bin.join("shardrop")).unwrap();
    std::fs::write(dir.join("aws.py"), AWS_SHIM).unwrap();
    std::fs::write(
        bin.join("aws"),
        format!(
            "#!/bin/sh\nexec {python} {} \"$@\"\n",
            dir.join("aws.py").display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bin.join("aws"), std::fs::Permissions::from_mode(0o755)).unwrap();
    write_update(&dir.join("model.safetensors"), 0.0);
    write_update(&dir.join("update.safetensors"), 1.0);
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("python/tests/eval_norm.py"),
        dir.join("eval.py"),
    )
    .unwrap();
    let block = readme_block("## Running the roles against a real bucket");
    // The virtualenv's bin: its `python` has numpy and safetensors.
    let venv_bin = Path::new(&python).parent().unwrap();
    let path = format!(
        "{}:{}:{}",
        bin.display(),
        venv_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new("bash");
    cmd.args(["-euo", "pipefail", "-c", &format!("set -x\n{block}")])
        .current_dir(dir)
        .env("PATH", path)
        // Its own memory of registries: an earlier run's run1 is not this one's past.
        .env("SHARDROP_STATE_DIR", dir.join("state"));
    for v in [
        "ENDPOINT_URL",
        "REGION",
        "ACCESS_KEY_ID",
        "SECRET_ACCESS_KEY",
        "ALLOW_HTTP",
    ] {
        if let Ok(x) = std::env::var(format!("AWS_{v}")) {
            cmd.env(format!("MINER7_AWS_{v}"), x);
        }
    }
    let out = cmd.output().unwrap();
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "the README block failed:\n{so}\n{se}");
    // The round happened: the miner's update was merged and moved the parameters, the
    // validator scored the miner, the late joiner holds what the miner holds, bit for bit.
    assert!(so.contains("1 accepted"), "{so}");
    assert_ne!(
        tensors(&dir.join("params.safetensors")),
        tensors(&dir.join("model.safetensors"))
    );
    assert_eq!(
        tensors(&dir.join("params-late.safetensors")),
        tensors(&dir.join("params.safetensors")),
        "the late joiner differs"
    );
    assert_eq!(
        tensors(&dir.join("outer-late.safetensors")),
        tensors(&dir.join("outer.safetensors")),
        "the late joiner's momentum differs"
    );
    assert!(dir.join("model/momentum-00000.safetensors").exists());
    assert!(dir.join("model/00000.safetensors").exists());
}
