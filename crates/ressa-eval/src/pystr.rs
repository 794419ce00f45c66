//! Python `str` semantics the official scripts rely on.
//!
//! The reference implementations are Python 3 programs; their results depend on
//! what `str.split()`, `str.strip()`, `str.lower()`, `re`'s `\d` and `round()`
//! do, which is not always what the obvious Rust counterpart does:
//!
//! * `str.split()` / `str.strip()` use `Py_UNICODE_ISSPACE`: the Unicode
//!   `White_Space` characters **plus** U+001C..U+001F (which Rust's
//!   `char::is_whitespace` does not include).
//! * `re` patterns on `str` match `\d` against every Unicode decimal digit
//!   (general category `Nd`), not just `[0-9]`.
//! * `round(x, 2)` rounds the exact binary value half-to-even and returns the
//!   nearest double to the decimal result; Rust's `{:.2}` formatting rounds the
//!   same way, so formatting and re-parsing reproduces it.
//!
//! Unicode tables are those of the Rust standard library / `regex-syntax`
//! (Unicode 16); the fixtures were produced with CPython 3.11 (Unicode 14).
//! The only possible difference is for characters assigned after Unicode 14.

use std::sync::LazyLock;

use regex::Regex;

/// `Py_UNICODE_ISSPACE`: what `str.split()` with no argument splits on.
pub fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `s.split()` (no argument): split on runs of Python whitespace, drop empties.
pub fn py_split(s: &str) -> impl Iterator<Item = &str> {
    s.split(is_py_space).filter(|w| !w.is_empty())
}

/// `s.strip()` (no argument).
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(is_py_space)
}

/// `s.lower()`: full Unicode lowercase mapping (including final sigma), which
/// is what Rust's `str::to_lowercase` implements as well.
pub fn py_lower(s: &str) -> String {
    s.to_lowercase()
}

static DECIMAL_DIGIT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^\p{Nd}$").expect("static pattern"));

/// `re`'s `\d` for `str` patterns: Unicode general category `Nd`.
pub fn is_py_decimal(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_digit();
    }
    let mut buf = [0u8; 4];
    DECIMAL_DIGIT.is_match(c.encode_utf8(&mut buf))
}

/// Python's `round(x, ndigits)` for `ndigits >= 0`.
pub fn py_round(x: f64, ndigits: usize) -> f64 {
    if !x.is_finite() {
        return x;
    }
    format!("{x:.ndigits$}").parse().unwrap_or(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_matches_python() {
        // Python: "a\x1cb\u00a0c  d\u3000".split() == ['a', 'b', 'c', 'd']
        let v: Vec<_> = py_split("a\u{1c}b\u{a0}c  d\u{3000}").collect();
        assert_eq!(v, ["a", "b", "c", "d"]);
        assert_eq!(py_split("   ").count(), 0);
        assert_eq!(py_strip("\u{1f} x y \n"), "x y");
    }

    #[test]
    fn decimal_digits() {
        assert!(is_py_decimal('7'));
        assert!(is_py_decimal('\u{0663}')); // ARABIC-INDIC DIGIT THREE
        assert!(is_py_decimal('\u{FF15}')); // FULLWIDTH DIGIT FIVE
        assert!(!is_py_decimal('\u{00B2}')); // SUPERSCRIPT TWO is No, not Nd
        assert!(!is_py_decimal('a'));
    }

    #[test]
    fn round_half_even_on_exact_value() {
        // Python: round(2.675, 2) == 2.67, round(0.125, 2) == 0.12, round(0.375, 2) == 0.38
        assert_eq!(py_round(2.675, 2), 2.67);
        assert_eq!(py_round(0.125, 2), 0.12);
        assert_eq!(py_round(0.375, 2), 0.38);
        assert_eq!(py_round(66.665, 2), 66.67);
        assert_eq!(py_round(100.0, 2), 100.0);
    }
}
