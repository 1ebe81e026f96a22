//! `ARCHITECTURE.md` is the map of the library, and this test keeps it true: every module
//! of `pipeline/src` belongs to one row of its "Modules" table, every row names a module
//! that exists, and no module uses (`crate::…` or `super::…` outside comments) a module
//! listed after it (a higher layer). Tests (files named `tests.rs`, and everything after a file's first
//! `#[cfg(test)]`) may use any module: the reference model, say.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The documented units, bottom to top, as module paths (`round::publish`).
fn documented_units(doc: &str) -> Vec<String> {
    let section = doc
        .split("\n## ")
        .find(|s| s.starts_with("Modules"))
        .expect("ARCHITECTURE.md has a \"## Modules\" section");
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_string)
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// `src/round/aggregate/v2.rs` → `["round", "aggregate", "v2"]`; `mod.rs` is its folder.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut segs: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(segs.last().map(String::as_str), Some("mod" | "lib")) {
        segs.pop();
    }
    segs
}

/// What the folders' `mod.rs` re-export: `round::RoundError` → `round::error`.
fn re_exports(src: &Path, files: &[PathBuf]) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for f in files.iter().filter(|f| f.ends_with("mod.rs")) {
        let here = module_path(src, f).join("::");
        for line in std::fs::read_to_string(f).unwrap().lines() {
            let Some(rest) = line.trim().strip_prefix("pub use ") else {
                continue;
            };
            let Some((sub, items)) = rest.trim_end_matches(';').split_once("::") else {
                continue;
            };
            for item in items.trim_matches(|c| c == '{' || c == '}').split(',') {
                let item = item.trim();
                if !item.is_empty() && !sub.contains("::") {
                    map.insert(format!("{here}::{item}"), format!("{here}::{sub}"));
                }
            }
        }
    }
    map
}

/// The documented unit a module path falls in: its longest documented prefix, through
/// re-exports.
fn unit_of(path: &str, units: &[String], re: &BTreeMap<String, String>) -> Option<usize> {
    let mut path = path.to_string();
    for _ in 0..8 {
        let segs: Vec<&str> = path.split("::").collect();
        let mut next = None;
        for k in (1..=segs.len()).rev() {
            let prefix = segs[..k].join("::");
            if let Some(i) = units.iter().position(|u| *u == prefix) {
                return Some(i);
            }
            if let Some(target) = re.get(&prefix) {
                next = Some(target.clone());
                break;
            }
        }
        path = next?;
    }
    None
}

/// Every `crate::a::b` or `super::a` path in the code of a file (comments and tests left
/// out), resolved to an absolute module path.
fn used_paths(text: &str, here: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let code = line.trim_start();
        // A file's test module (`#[cfg(test)] mod …`) may use anything; any other
        // `#[cfg(test)]` item is code like the rest.
        if code.starts_with("#[cfg(test)]")
            && lines
                .get(i + 1)
                .is_some_and(|next| next.trim_start().starts_with("mod "))
        {
            break;
        }
        if code.starts_with("//") {
            continue;
        }
        let code = code.split(" //").next().unwrap_or(code);
        let mut rest = code;
        while let Some(i) = rest.find(['c', 's']) {
            let tail = &rest[i..];
            let boundary = i == 0
                || !rest[..i]
                    .chars()
                    .next_back()
                    .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
            let (base, after) = if let Some(t) = tail.strip_prefix("crate::") {
                (Some(Vec::new()), t)
            } else if tail.starts_with("super::") {
                let mut t = tail;
                let mut up = 0;
                while let Some(x) = t.strip_prefix("super::") {
                    t = x;
                    up += 1;
                }
                (here.len().checked_sub(up).map(|n| here[..n].to_vec()), t)
            } else {
                (None, "")
            };
            match (boundary, base) {
                (true, Some(mut base)) => {
                    let ident: String = after
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                        .collect();
                    base.extend(
                        ident
                            .split("::")
                            .filter(|s| !s.is_empty())
                            .map(str::to_string),
                    );
                    out.push(base.join("::"));
                    rest = &tail[1..];
                }
                _ => rest = &tail[1..],
            }
        }
    }
    out
}

#[test]
fn architecture_md_is_the_module_order() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("src");
    let doc = std::fs::read_to_string(root.join("../ARCHITECTURE.md")).unwrap();
    let units = documented_units(&doc);
    assert!(
        units.len() > 10,
        "the Modules table lists the modules: {units:?}"
    );
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let re = re_exports(&src, &files);

    let mut problems = Vec::new();
    for u in &units {
        let p = src.join(u.replace("::", "/"));
        if !p.is_dir() && !p.with_extension("rs").is_file() {
            problems.push(format!(
                "ARCHITECTURE.md lists `{u}`, which is not a module"
            ));
        }
    }
    for f in &files {
        let here = module_path(&src, f);
        let name = here.join("::");
        // The crate root and the folders that only group modules (format/, round/) belong
        // to no row; they may declare and re-export their modules, and use no module.
        let container = here.is_empty()
            || (f.ends_with("mod.rs") && units.iter().any(|u| u.starts_with(&format!("{name}::"))));
        if container {
            if !here.is_empty() {
                for used in used_paths(&std::fs::read_to_string(f).unwrap(), &here) {
                    problems.push(format!(
                        "{}: the folder module `{name}` uses `{used}`; only its modules may",
                        f.display()
                    ));
                }
            }
            continue;
        }
        let Some(me) = unit_of(&name, &units, &re) else {
            problems.push(format!(
                "{}: module `{name}` is in no row of ARCHITECTURE.md",
                f.display()
            ));
            continue;
        };
        if f.ends_with("tests.rs") {
            continue;
        }
        for used in used_paths(&std::fs::read_to_string(f).unwrap(), &here) {
            match unit_of(&used, &units, &re) {
                Some(u) if u > me => problems.push(format!(
                    "{}: `{}` uses `{used}` (`{}`), which ARCHITECTURE.md lists after it (a higher layer)",
                    f.display(),
                    units[me],
                    units[u]
                )),
                Some(_) => {}
                // A path the check cannot place (a grouped `use crate::{…}`, say) fails
                // rather than passes unchecked.
                None => problems.push(format!(
                    "{}: `{used}` is in no row of ARCHITECTURE.md (write one path per `use`)",
                    f.display()
                )),
            }
        }
    }
    problems.sort();
    problems.dedup();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_checker_sees_an_upward_edge() {
    // The rule applied to a made-up pair: `a` below `b`, and `a` using `b`.
    let units = vec!["a".to_string(), "b".to_string()];
    let here = vec!["a".to_string()];
    let used = used_paths(
        "use crate::b::Thing;\n// crate::b in a comment\n#[cfg(test)]\nfn helper() { crate::c::x() }\n#[cfg(test)]\nmod tests {\nuse crate::b::T;",
        &here,
    );
    assert_eq!(
        used,
        ["b::Thing", "c::x"],
        "only the test module is left out"
    );
    // A grouped import names no module the check can place: it is reported, not passed.
    let grouped = used_paths("use crate::{b::Thing};", &here);
    assert_eq!(unit_of(&grouped[0], &units, &BTreeMap::new()), None);
    let re = BTreeMap::new();
    assert_eq!(unit_of(&used[0], &units, &re), Some(1));
    let sup = used_paths("let x = super::super::c::D;", &["a".into(), "b".into()]);
    assert_eq!(sup, ["c::D"]);
    let mut re = BTreeMap::new();
    re.insert("b::Item".to_string(), "b::inner".to_string());
    let units = vec!["b::inner".to_string()];
    assert_eq!(unit_of("b::Item", &units, &re), Some(0));
}
