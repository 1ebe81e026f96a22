//! Every reason-code enum of the library is the table of `schemas/` it implements: the same
//! set of codes, no more, no fewer. A code added in the code and not in the spec (or the
//! other way round) fails here.

use std::collections::BTreeSet;
use std::path::PathBuf;

use shardrop::checkpoint::CkptReason;
use shardrop::format::codec::CodecReason;
use shardrop::format::envelope::Reason;
use shardrop::format::tables::Verdict;
use shardrop::round::RoundReason;
use shardrop::round::verdict::LedgerReason;

fn schema(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../schemas")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The rows of the first table after the heading that contains `heading`: each row's cells,
/// without the header and separator rows.
fn table(doc: &str, heading: &str) -> Vec<Vec<String>> {
    let start = doc
        .lines()
        .position(|l| l.starts_with('#') && l.contains(heading))
        .unwrap_or_else(|| panic!("no heading with {heading:?}"));
    let rows: Vec<Vec<String>> = doc
        .lines()
        .skip(start + 1)
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect();
    assert!(rows.len() > 2, "the table under {heading:?} has rows");
    rows.into_iter().skip(2).collect()
}

/// The backticked codes of column `col` (`a` / `b` cells give both): snake-case words only
/// (a cell's `""` or a file name is not a code).
fn codes(rows: &[Vec<String>], col: usize) -> BTreeSet<String> {
    rows.iter()
        .filter_map(|r| r.get(col))
        .flat_map(|cell| {
            cell.split('`')
                .skip(1)
                .step_by(2)
                .filter(|c| {
                    c.starts_with(|ch: char| ch.is_ascii_lowercase())
                        && c.chars().all(|ch| ch.is_ascii_lowercase() || ch == '_')
                })
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn set<'a>(it: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    it.into_iter().map(str::to_string).collect()
}

#[test]
fn envelope_reasons_are_its_table() {
    let doc = schema("envelope.md");
    let want = codes(&table(&doc, "5. "), 0);
    assert_eq!(set(Reason::ALL.iter().map(|r| r.code())), want);
}

#[test]
fn codec_reasons_are_its_table() {
    let doc = schema("gradient.md");
    let want = codes(&table(&doc, "4. Decoding"), 0);
    assert_eq!(set(CodecReason::ALL.iter().map(|r| r.code())), want);
}

#[test]
fn ledger_reasons_are_the_verdict_table() {
    let doc = schema("round.md");
    let rows = table(&doc, "Verdicts (aggregator and validator)");
    // The reason column names the round's own codes and some of the envelope's (by name,
    // beside "any envelope reason"); those are the envelope's enum, not this one.
    let envelope = set(Reason::ALL.iter().map(|r| r.code()));
    let codec = set(CodecReason::ALL.iter().map(|r| r.code()));
    let own: BTreeSet<String> = codes(&rows, 1)
        .into_iter()
        .filter(|c| !envelope.contains(c) && !codec.contains(c))
        .collect();
    assert_eq!(set(LedgerReason::ALL.iter().map(|r| r.code())), own);
    let verdicts = codes(&rows, 0);
    assert!(
        verdicts.is_empty(),
        "verdicts are plain words: {verdicts:?}"
    );
    let words: BTreeSet<String> = rows.iter().map(|r| r[0].clone()).collect();
    assert_eq!(set(Verdict::ALL.iter().map(|v| v.as_str())), words);
}

#[test]
fn round_reasons_are_its_table() {
    let doc = schema("round.md");
    let want = codes(&table(&doc, "Reason codes (errors of the round"), 0);
    assert_eq!(set(RoundReason::ALL.iter().map(|r| r.code())), want);
}

#[test]
fn checkpoint_reasons_are_its_table() {
    let doc = schema("checkpoint.md");
    let want = codes(&table(&doc, "8. Reason codes"), 0);
    assert_eq!(set(CkptReason::ALL.iter().map(|r| r.code())), want);
}

#[test]
fn codes_parse_back_and_differ() {
    let all: Vec<&str> = (Reason::ALL.iter().map(|r| r.code()))
        .chain(CodecReason::ALL.iter().map(|r| r.code()))
        .chain(LedgerReason::ALL.iter().map(|r| r.code()))
        .chain(RoundReason::ALL.iter().map(|r| r.code()))
        .chain(CkptReason::ALL.iter().map(|r| r.code()))
        .collect();
    for r in RoundReason::ALL {
        assert_eq!(RoundReason::parse(r.code()), Some(*r));
    }
    for r in LedgerReason::ALL {
        assert_eq!(LedgerReason::parse(r.code()), Some(*r));
    }
    assert_eq!(RoundReason::parse("window_closd"), None);
    // `over_limit` is the envelope's and the codec's (the same meaning at two layers); no
    // other code is spelled twice, so a ledger's reason names one rule.
    let mut seen = BTreeSet::new();
    let twice: Vec<&str> = all.iter().copied().filter(|c| !seen.insert(*c)).collect();
    assert_eq!(twice, ["over_limit"]);
}
