//! One exit-code rule for every command (README, "CLI"): 0 ok, 2 usage, 3 rejected or
//! refused with a reason code, 1 anything else; with `--json` a failure always prints its
//! JSON document, usage errors included. Every command of `shardrop --help` has a case.

use std::collections::BTreeSet;

use crate::common::{Run, json, ok_json, p, shardrop, stderr};

/// The commands `shardrop [GROUP] --help` lists (without `help`).
fn commands(group: &[&str]) -> BTreeSet<String> {
    let mut args = group.to_vec();
    args.push("--help");
    let out = shardrop(&args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(|c| {
            let mut full = group.to_vec();
            full.push(c);
            full.join(" ")
        })
        .collect()
}

/// Exit 2, and with `--json` one JSON error document of class null.
fn usage(args: &[&str]) {
    let mut with_json = args.to_vec();
    with_json.push("--json");
    let out = shardrop(&with_json);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    let doc = json(&out);
    assert_eq!(doc["ok"], false, "{args:?}: {doc}");
    assert!(doc["class"].is_null(), "{args:?}: {doc}");
    assert!(
        !doc["error"].as_str().unwrap().is_empty(),
        "{args:?}: {doc}"
    );
}

#[test]
fn every_command_exits_2_on_usage_errors_with_a_json_document() {
    let tmp = tempfile::tempdir().unwrap();
    let f = |name: &str| tmp.path().join(name).display().to_string();
    let (reg, key, out) = (f("reg"), f("k.key"), f("out"));
    ok_json(shardrop(&["keygen", "--out", &key, "--json"]));
    let model = f("model.safetensors");
    crate::common::write_update(std::path::Path::new(&model), 0.0);
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("keygen", vec!["keygen"]),
        ("sign", vec!["sign"]),
        ("verify", vec!["verify"]),
        ("inspect", vec!["inspect"]),
        ("get", vec!["get"]),
        (
            "grad encode",
            vec![
                "grad",
                "encode",
                "u.safetensors",
                "--values",
                "int3",
                "--out",
                &out,
            ],
        ),
        ("grad decode", vec!["grad", "decode"]),
        (
            "run init",
            vec![
                "run",
                "init",
                "--run",
                "r",
                "--key",
                &key,
                "--store",
                &out,
                "--model",
                &model,
                "--genesis",
                "yesterday",
            ],
        ),
        (
            "run add",
            vec![
                "run",
                "add",
                "--registry",
                &reg,
                "--key",
                &key,
                "--role",
                "boss",
                "--peer",
                "x",
                "--store",
                &out,
            ],
        ),
        ("run show", vec!["run", "show"]),
        ("run window", vec!["run", "window"]),
        (
            "run set",
            vec![
                "run",
                "set",
                "--registry",
                &reg,
                "--key",
                &key,
                "--from-window",
                "soon",
            ],
        ),
        ("publish", vec!["publish"]),
        (
            "aggregate",
            vec!["aggregate", "--registry", &reg, "--key", &key],
        ),
        ("apply", vec!["apply"]),
        ("prefetch", vec!["prefetch"]),
        (
            "validate",
            vec![
                "validate",
                "--registry",
                &reg,
                "--key",
                &key,
                "--evaluator",
                "oracle",
            ],
        ),
        ("scores show", vec!["scores", "show"]),
        ("scores history", vec!["scores", "history"]),
        ("ckpt push", vec!["ckpt", "push"]),
        (
            "ckpt pull",
            vec!["ckpt", "pull", "https://example.invalid/m", &out],
        ),
        ("ckpt ls", vec!["ckpt", "ls"]),
        ("ckpt verify", vec!["ckpt", "verify"]),
        ("ckpt gc", vec!["ckpt", "gc"]),
        ("bench codec", vec!["bench", "codec", "--bogus"]),
        ("bench round", vec!["bench", "round", "--bogus"]),
        ("bench ckpt", vec!["bench", "ckpt", "--bogus"]),
        ("demo", vec!["demo", "--windows", "1", "--dir", &out]),
        ("(none)", vec!["no-such-command"]),
    ];
    let covered: BTreeSet<String> = cases.iter().map(|(c, _)| c.to_string()).collect();
    let mut all = commands(&[]);
    for group in ["grad", "run", "scores", "ckpt", "bench"] {
        assert!(all.remove(group), "{group} is not a command any more");
        all.extend(commands(&[group]));
    }
    let missing: Vec<&String> = all.difference(&covered).collect();
    assert!(
        missing.is_empty(),
        "commands without a usage case: {missing:?}"
    );
    for (_, args) in &cases {
        usage(args);
    }
}

/// A key that is not registered in the role it acts in is refused with `not_registered`
/// (exit 3) by every role's command.
#[test]
fn every_role_command_refuses_an_unregistered_key_with_exit_3() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let base = dir.join("store").display().to_string();
    let agg_key = dir.join("agg.key");
    let run = Run::init(dir, &base, "exits", 60, &agg_key, &[]);
    let stranger = dir.join("stranger.key");
    let peer = ok_json(shardrop(&["keygen", "--out", p(&stranger), "--json"]))["peer_id"]
        .as_str()
        .unwrap()
        .to_string();
    let update = dir.join("u.safetensors");
    crate::common::write_update(&update, 1.0);
    let state = dir.join("state");
    let model_dir = dir.join("m");
    std::fs::create_dir_all(&model_dir).unwrap();
    std::fs::copy(
        dir.join("model.safetensors"),
        model_dir.join("model.safetensors"),
    )
    .unwrap();
    let k = p(&stranger);
    let cases: Vec<Vec<&str>> = vec![
        vec![
            "publish",
            "--registry",
            &run.reg,
            "--key",
            k,
            p(&update),
            "--state",
            p(&state),
        ],
        vec![
            "aggregate",
            "--registry",
            &run.reg,
            "--key",
            k,
            "--window",
            "0",
        ],
        vec![
            "validate",
            "--registry",
            &run.reg,
            "--key",
            k,
            "--window",
            "0",
        ],
        vec![
            "ckpt",
            "push",
            p(&model_dir),
            "--registry",
            &run.reg,
            "--key",
            k,
            "--step",
            "1",
        ],
        vec!["ckpt", "gc", &run.reg, "--key", k, "--keep", "1"],
        vec![
            "run",
            "add",
            "--registry",
            &run.reg,
            "--key",
            k,
            "--role",
            "miner",
            "--peer",
            &peer,
            "--store",
            &base,
        ],
        vec![
            "run",
            "set",
            "--registry",
            &run.reg,
            "--key",
            k,
            "--from-window",
            "next",
            "--outer-lr",
            "0.5",
        ],
    ];
    for args in cases {
        let mut with_json = args.clone();
        with_json.push("--json");
        let out = shardrop(&with_json);
        let doc = json(&out);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {doc}");
        assert_eq!(doc["class"], "refused", "{args:?}: {doc}");
        assert_eq!(doc["reason"], "not_registered", "{args:?}: {doc}");
    }
    // The refused publish left its state folder as it was: no lock file behind.
    assert!(!state.join("state.lock").exists());
}
