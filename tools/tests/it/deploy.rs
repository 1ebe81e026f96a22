//! Every file in deploy/ that a tool can check is checked: YAML parses and has the expected
//! kinds and services; systemd units pass `systemd-analyze verify` (where installed); and
//! every `shardrop` command line in deploy/ (YAML, units, README) and in the top README's
//! code blocks names subcommands and flags that the CLI really has.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn docs(path: &Path) -> Vec<Yaml> {
    let text = std::fs::read_to_string(path).unwrap();
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    v.sort();
    v
}

#[test]
fn compose_has_minio_buckets_init_and_following_jobs() {
    let d = docs(&deploy().join("compose.yaml"));
    let services = d[0]["services"].as_hash().expect("services");
    let names: BTreeSet<&str> = services.keys().filter_map(|k| k.as_str()).collect();
    assert_eq!(
        names,
        BTreeSet::from(["minio", "buckets", "init", "aggregator", "validator"])
    );
    for (svc, sub) in [("aggregator", "aggregate"), ("validator", "validate")] {
        let cmd: Vec<&str> = d[0]["services"][svc]["command"]
            .as_vec()
            .unwrap()
            .iter()
            .filter_map(|x| x.as_str())
            .collect();
        assert_eq!(cmd[0], sub);
        assert!(cmd.contains(&"--follow"), "{svc} must follow every window");
    }
}

#[test]
fn kubernetes_manifests_have_the_expected_kinds() {
    let mut kinds: Vec<(String, String)> = Vec::new();
    for f in files(&deploy().join("k8s"), "yaml") {
        for d in docs(&f) {
            let kind = d["kind"].as_str().unwrap_or_default().to_string();
            assert!(
                d["apiVersion"].as_str().is_some(),
                "{}: apiVersion",
                f.display()
            );
            kinds.push((
                kind,
                d["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            ));
            if d["kind"].as_str() == Some("Job")
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.contains("parts"))
            {
                assert_eq!(d["spec"]["completionMode"].as_str(), Some("Indexed"));
            }
        }
    }
    let crons: BTreeSet<&str> = kinds
        .iter()
        .filter(|(k, _)| k == "CronJob")
        .map(|(_, n)| n.as_str())
        .collect();
    assert_eq!(
        crons,
        BTreeSet::from([
            "shardrop-aggregator",
            "shardrop-validator",
            "shardrop-retention"
        ])
    );
    assert_eq!(kinds.iter().filter(|(k, _)| k == "Job").count(), 2);
    assert!(kinds.iter().any(|(k, _)| k == "Secret"));
}

#[test]
fn systemd_units_verify() {
    let have = Command::new("systemd-analyze").arg("--version").output();
    if !have.is_ok_and(|o| o.status.success()) {
        eprintln!("systemd-analyze not installed: unit files not verified");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    for ext in ["service", "timer"] {
        for f in files(&deploy().join("systemd"), ext) {
            // Point ExecStart at the binary under test (verify checks it is executable).
            let text = std::fs::read_to_string(&f)
                .unwrap()
                .replace("/usr/local/bin/shardrop", env!("CARGO_BIN_EXE_shardrop"));
            let dst = tmp.path().join(f.file_name().unwrap());
            std::fs::write(&dst, text).unwrap();
            units.push(dst);
        }
    }
    assert_eq!(units.len(), 6);
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

/// Every `shardrop …` invocation in deploy/: YAML argument lists, shell snippets, ExecStart
/// lines and README code lines.
fn shell_commands(origin: &str, text: &str) -> Vec<(String, Vec<String>)> {
    let mut found = Vec::new();
    {
        let code: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        let joined = code.replace("\\\n", " ");
        for seg in joined.split(['\n', ';']).flat_map(|s| s.split("&&")) {
            let Some(at) = seg.find("shardrop ") else {
                continue;
            };
            let before = &seg[..at];
            // Only invocations: the binary at a word start (not a bucket or file name).
            if !(before.is_empty() || before.ends_with([' ', '(', '\'', '"', '/'])) {
                continue;
            }
            let rest = &seg[at + "shardrop ".len()..];
            let argv: Vec<String> = rest
                .split_whitespace()
                .map(|t| t.trim_matches(|c| c == '\'' || c == '"'))
                .take_while(|t| !t.starts_with('|') && !t.starts_with('>') && !t.starts_with(')'))
                // The end of a `$(shardrop …)` ends the command too: parentheses are counted
                // across tokens, and the command ends where they close below zero.
                .scan((0i64, false), |(depth, ended), t| {
                    if *ended {
                        return None;
                    }
                    *depth += t.matches('(').count() as i64 - t.matches(')').count() as i64;
                    *ended = *depth < 0;
                    Some(match *ended {
                        true => t.trim_end_matches(')').to_string(),
                        false => t.to_string(),
                    })
                })
                .filter(|t| !t.is_empty())
                .collect();
            if argv.first().is_some_and(|a| {
                a.starts_with(|c: char| c.is_ascii_lowercase())
                    && a.chars().all(|c| c.is_ascii_lowercase() || c == '-')
            }) {
                found.push((origin.to_string(), argv));
            }
        }
    }
    found
}

fn command_lines() -> Vec<(String, Vec<String>)> {
    let mut found = Vec::new();
    let d = deploy();
    let mut yamls = vec![d.join("compose.yaml")];
    yamls.extend(files(&d.join("k8s"), "yaml"));
    for f in &yamls {
        let text = std::fs::read_to_string(f).unwrap();
        found.extend(shell_commands(&f.display().to_string(), &text));
        fn walk(y: &Yaml, key: Option<&str>, out: &mut Vec<Vec<String>>) {
            match y {
                Yaml::Hash(h) => {
                    for (k, v) in h {
                        walk(v, k.as_str(), out);
                    }
                }
                Yaml::Array(a) => {
                    let strs: Vec<String> = a
                        .iter()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect();
                    if matches!(key, Some("args" | "command"))
                        && strs.len() == a.len()
                        && !strs.is_empty()
                    {
                        out.push(strs);
                    }
                    for x in a {
                        walk(x, None, out);
                    }
                }
                _ => {}
            }
        }
        let mut lists = Vec::new();
        for doc in docs(f) {
            walk(&doc, None, &mut lists);
        }
        for l in lists {
            // Argument lists of the shardrop image: they start with a subcommand.
            if l[0].chars().all(|c| c.is_ascii_lowercase())
                && !["server", "sh", "mc"].contains(&l[0].as_str())
            {
                found.push((f.display().to_string(), l));
            }
        }
    }
    for f in files(&d.join("systemd"), "service") {
        for line in std::fs::read_to_string(&f).unwrap().lines() {
            if let Some(cmd) = line.strip_prefix("ExecStart=") {
                found.extend(shell_commands(
                    &f.display().to_string(),
                    &cmd.replace("/usr/local/bin/shardrop", "shardrop"),
                ));
            }
        }
    }
    // The READMEs' code blocks only (their prose mentions the binary too).
    for readme in [d.join("README.md"), d.join("../README.md")] {
        let text = std::fs::read_to_string(&readme).unwrap();
        for block in text.split("```").skip(1).step_by(2) {
            found.extend(shell_commands(&readme.display().to_string(), block));
        }
    }
    found
}

struct Cli {
    help: HashMap<Vec<String>, Option<String>>,
}

impl Cli {
    fn help(&mut self, path: &[String]) -> Option<String> {
        self.help
            .entry(path.to_vec())
            .or_insert_with(|| {
                let out = Command::new(env!("CARGO_BIN_EXE_shardrop"))
                    .args(path)
                    .arg("--help")
                    .output()
                    .ok()?;
                out.status
                    .success()
                    .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
            })
            .clone()
    }

    fn subcommands(&mut self, path: &[String]) -> BTreeSet<String> {
        let Some(h) = self.help(path) else {
            return BTreeSet::new();
        };
        h.split("Commands:")
            .nth(1)
            .map(|s| s.split("\n\n").next().unwrap_or(""))
            .unwrap_or("")
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(String::from))
            .collect()
    }
}

#[test]
fn every_command_line_in_deploy_exists_in_the_cli() {
    let lines = command_lines();
    let mut cli = Cli {
        help: HashMap::new(),
    };
    let global = cli.help(&[]).unwrap();
    let mut seen_subcommands = BTreeSet::new();
    for (origin, argv) in &lines {
        let mut path: Vec<String> = Vec::new();
        for t in argv {
            if t.starts_with('-') || !cli.subcommands(&path).contains(t) {
                break;
            }
            path.push(t.clone());
        }
        assert!(
            !path.is_empty(),
            "{origin}: `shardrop {}` names no subcommand",
            argv.join(" ")
        );
        let help = cli.help(&path).unwrap();
        assert!(
            cli.subcommands(&path).is_empty(),
            "{origin}: `shardrop {}` stops at a command group",
            argv.join(" ")
        );
        for flag in argv.iter().filter(|t| t.starts_with("--")) {
            let name = flag.split('=').next().unwrap();
            assert!(
                help.contains(&format!("{name} "))
                    || help.contains(&format!("{name}\n"))
                    || help.contains(&format!("{name}="))
                    || global.contains(&format!("{name} ")),
                "{origin}: `shardrop {}` has no flag {name}",
                path.join(" ")
            );
        }
        seen_subcommands.insert(path.join(" "));
    }
    // The files really exercise the jobs they are for.
    for want in [
        "aggregate",
        "validate",
        "ckpt gc",
        "run init",
        "run add",
        "keygen",
        "publish",
    ] {
        assert!(
            seen_subcommands.contains(want),
            "no `shardrop {want}` found in deploy/: {seen_subcommands:?}"
        );
    }
    assert!(lines.len() >= 12, "{lines:?}");
}

#[test]
fn the_flag_checker_catches_a_wrong_flag() {
    let mut cli = Cli {
        help: HashMap::new(),
    };
    let path = vec!["aggregate".to_string()];
    let help = cli.help(&path).unwrap();
    assert!(help.contains("--once "));
    assert!(!help.contains("--no-such-flag"));
    assert!(cli.subcommands(&[]).contains("ckpt"));
    assert!(cli.subcommands(&["ckpt".to_string()]).contains("gc"));
}
