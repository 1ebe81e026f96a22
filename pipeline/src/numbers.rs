//! Decimal text ↔ binary32, as the spec fixes it for every f32 a signed document holds
//! (settings rates and decays, agg-v2 merge weights): `round.md`, "Numbers".
//!
//! serde_json reads an f32 field through f64 (`text → f64 → f32`, two roundings), which for
//! a decimal that is not an f32's shortest form can differ from the one correct rounding
//! `text → f32`. A second implementation would have to guess which of the two the spec
//! means; here the rule is the single rounding, and the text is read as the decimal it is.

use serde::de::{Deserialize, Deserializer, Error};
use serde_json::value::RawValue;

/// The binary32 nearest to the JSON number `text` (ties to even), rounded once. `None` for
/// text that is not a JSON number, or a finite number beyond the f32 range.
pub fn parse_f32(text: &str) -> Option<f32> {
    decimal(text)?;
    text.parse::<f32>().ok().filter(|v| v.is_finite())
}

/// Whether `text` is the shortest decimal that reads back as `v`: the digits Rust's (and
/// every Ryu-style printer's) shortest round-trip form gives, in any JSON spelling (`0.05`,
/// `5e-2` and `5.0E-2` are the same decimal). Writers emit it; readers of agg-v2 weights
/// refuse anything longer, so one weight has one signed form.
pub fn is_shortest_f32(text: &str, v: f32) -> bool {
    match (decimal(text), decimal(&format!("{v:e}"))) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// A JSON number as (negative, significant digits without leading or trailing zeros,
/// decimal exponent of the last digit); zero is `(false, "", 0)` whatever its sign or
/// spelling. `None` unless `text` follows JSON's number grammar.
fn decimal(text: &str) -> Option<(bool, String, i64)> {
    let b = text.as_bytes();
    let mut i = 0;
    let neg = b.first() == Some(&b'-');
    if neg {
        i += 1;
    }
    let int_start = i;
    while b.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
    }
    let int = &text[int_start..i];
    if int.is_empty() || (int.len() > 1 && int.starts_with('0')) {
        return None;
    }
    let mut frac = "";
    if b.get(i) == Some(&b'.') {
        let s = i + 1;
        i = s;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        frac = &text[s..i];
        if frac.is_empty() {
            return None;
        }
    }
    let mut exp: i64 = 0;
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        let minus = match b.get(i) {
            Some(b'-') => {
                i += 1;
                true
            }
            Some(b'+') => {
                i += 1;
                false
            }
            _ => false,
        };
        let s = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if s == i {
            return None;
        }
        // Exponents past any f32's reach are clamped: they still compare unequal.
        exp = text[s..i]
            .parse::<i64>()
            .unwrap_or(i64::MAX / 4)
            .min(i64::MAX / 4);
        if minus {
            exp = -exp;
        }
    }
    if i != b.len() {
        return None;
    }
    let digits = format!("{int}{frac}");
    let lead = digits.len() - digits.trim_start_matches('0').len();
    let sig = digits[lead..].trim_end_matches('0');
    if sig.is_empty() {
        return Some((false, String::new(), 0));
    }
    let trailing = digits.len() - lead - sig.len();
    let last = exp - frac.len() as i64 + trailing as i64;
    Some((neg, sig.to_string(), last))
}

/// serde `deserialize_with` for an f32 field: the JSON number's text rounded once to the
/// nearest f32 ([`parse_f32`]), never through f64.
pub fn f32_text<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    F32Text::deserialize(d).map(|t| t.value)
}

/// An f32 read from a signed document together with whether its text was the shortest
/// form ([`is_shortest_f32`]); written back as the shortest form.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct F32Text {
    /// The value, rounded once from the text.
    pub value: f32,
    /// Whether the text was the value's shortest decimal.
    pub shortest: bool,
}

impl From<f32> for F32Text {
    fn from(value: f32) -> Self {
        F32Text {
            value,
            shortest: true,
        }
    }
}

impl serde::Serialize for F32Text {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f32(self.value)
    }
}

impl<'de> Deserialize<'de> for F32Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = <Box<RawValue>>::deserialize(d)?;
        let value = parse_f32(raw.get()).ok_or_else(|| {
            D::Error::custom(format!(
                "{} is not a finite number in the f32 range",
                raw.get()
            ))
        })?;
        Ok(F32Text {
            value,
            shortest: is_shortest_f32(raw.get(), value),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rounding_from_text() {
        assert_eq!(parse_f32("0.7"), Some(0.7f32));
        assert_eq!(parse_f32("1e-50"), Some(0.0));
        assert_eq!(parse_f32("0.123456789012345"), Some(0.12345679));
        assert_eq!(parse_f32("1e39"), None);
        assert_eq!(parse_f32("01"), None);
        assert_eq!(parse_f32("1."), None);
        assert_eq!(parse_f32("NaN"), None);
        assert_eq!(parse_f32("inf"), None);
        // A decimal just above the midpoint between two f32s, whose nearest f64 is the
        // midpoint itself: through f64 it ties to even (down), rounded once it goes up.
        let lo = 1.0f32;
        let hi = f32::from_bits(lo.to_bits() + 1);
        let mid = (f64::from(lo) + f64::from(hi)) / 2.0;
        let text = format!("{mid:.30}1");
        assert_eq!((text.parse::<f64>().unwrap() as f32), lo, "{text}");
        assert_eq!(parse_f32(&text), Some(hi), "{text}");
    }

    #[test]
    fn shortest_form_in_any_spelling() {
        let w = 1.0f32 / 3.0;
        for ok in ["0.33333334", "3.3333334e-1", "33333334E-8", "0.333333340"] {
            assert!(is_shortest_f32(ok, w), "{ok}");
        }
        for bad in ["0.333333343", "0.3333333432674408", "0.3333333"] {
            assert!(!is_shortest_f32(bad, w), "{bad}");
        }
        assert!(is_shortest_f32("0.05", 0.05));
        assert!(is_shortest_f32("5e-2", 0.05));
        assert!(is_shortest_f32("0", 0.0));
        assert!(is_shortest_f32("0.25", 0.25));
        assert!(!is_shortest_f32("-0.25", 0.25));
        let d: F32Text = serde_json::from_str("0.0500000007").unwrap();
        assert_eq!(d.value, 0.05);
        assert!(!d.shortest);
        assert_eq!(serde_json::to_string(&d).unwrap(), "0.05");
    }
}
