//! Java's `String.toLowerCase(Locale.ENGLISH)`, as the PTB tokenizer applies
//! it to every token (`-lowerCase`).
//!
//! It equals Rust's full lowercase mapping except for GREEK CAPITAL LETTER
//! SIGMA, whose lowercase depends on context. The JDK
//! (`java.lang.ConditionalSpecialCasing.isFinalCased`) makes it final (`ς`)
//! when a *cased* character precedes it and none follows it **within the same
//! word**, where words come from `BreakIterator.getWordInstance()` (the JDK's
//! own rule set, not UAX #29) and "cased" is the JDK's `isCased` (general
//! category Lu/Ll/Lt plus a fixed list of Other_Lowercase/Other_Uppercase
//! ranges). Rust applies Unicode's `Final_Sigma` context instead. Both the
//! word segmentation and `isCased` are reproduced here; they were checked
//! against a JDK 17 `BreakIterator` and the tokenizer jar on generated text.

use std::sync::LazyLock;

use regex::Regex;
use regex_automata::{
    Anchored, Input, MatchKind,
    hybrid::dfa::{DFA, OverlappingState},
};

const SIGMA: char = '\u{3A3}';

/// `s.toLowerCase(Locale.ENGLISH)`.
pub(crate) fn to_lower_case(s: &str) -> String {
    if !s.contains(SIGMA) {
        return s.to_lowercase();
    }
    let chars: Vec<char> = s.chars().collect();
    let boundaries = word_boundaries(&chars);
    let mut out = String::with_capacity(s.len());
    for (i, &c) in chars.iter().enumerate() {
        if c == SIGMA {
            out.push(if is_final_cased(&chars, i, &boundaries) {
                '\u{3C2}'
            } else {
                '\u{3C3}'
            });
        } else {
            out.extend(c.to_lowercase());
        }
    }
    out
}

/// `ConditionalSpecialCasing.isFinalCased`.
fn is_final_cased(chars: &[char], index: usize, boundary: &[bool]) -> bool {
    let mut i = index;
    while !boundary[i] {
        if is_cased(chars[i - 1]) {
            let mut j = index + 1;
            while j < chars.len() && !boundary[j] {
                if is_cased(chars[j]) {
                    return false;
                }
                j += 1;
            }
            return true;
        }
        i -= 1;
    }
    false
}

/// `ConditionalSpecialCasing.isCased`.
fn is_cased(c: char) -> bool {
    static CASED: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"^[\p{Lu}\p{Ll}\p{Lt}]$").expect("static pattern"));
    let u = u32::from(c);
    let mut buf = [0u8; 4];
    CASED.is_match(c.encode_utf8(&mut buf))
        || (0x2B0..=0x2B8).contains(&u)
        || (0x2C0..=0x2C1).contains(&u)
        || (0x2E0..=0x2E4).contains(&u)
        || u == 0x345
        || u == 0x37A
        || (0x1D2C..=0x1D61).contains(&u)
        || (0x2160..=0x217F).contains(&u)
        || (0x24B6..=0x24E9).contains(&u)
}

/// Character classes of the JDK word-break rules, one ASCII letter each:
/// `l` letter, `d` digit, `w` mid-word punctuation (dashes, connectors, soft
/// hyphen, U+2027), `b` `"`/`'` (mid-word and mid-number), `p` `.` (also a
/// number prefix), `c` `,`/U+066B (mid-number), `q` number suffix, `y` `¢`
/// (prefix and suffix), `r` other number prefix (currency, `#`, `^`), `k`
/// kanji, `a` katakana, `h` hiragana, `x` danda, `s` space, `R` CR, `e` line
/// separator, `o` anything else. `None`: ignored (Mn, Me, Cf).
fn class(c: char) -> Option<char> {
    static CATS: LazyLock<[Regex; 7]> = LazyLock::new(|| {
        [
            r"^[\p{Mn}\p{Me}\p{Cf}]$",
            r"^[\p{L}\p{Mc}]$",
            r"^\p{N}$",
            r"^[\p{Pd}\p{Pc}]$",
            r"^\p{Sc}$",
            r"^\p{Zs}$",
            r"^[\x{3005}\x{4E00}-\x{9FA5}\x{F900}-\x{F9FF}]$",
        ]
        .map(|p| Regex::new(p).expect("static pattern"))
    });
    let mut buf = [0u8; 4];
    let s: &str = c.encode_utf8(&mut buf);
    let is = |k: usize| CATS[k].is_match(s);
    Some(match c {
        '"' | '\'' => 'b',
        '.' => 'p',
        ',' | '\u{66B}' => 'c',
        '%' | '&' | '\u{66A}' | '\u{2030}' | '\u{2031}' => 'q',
        '\u{A2}' => 'y',
        '#' | '^' => 'r',
        '\u{AD}' | '\u{2027}' => 'w',
        '\u{964}' | '\u{965}' => 'x',
        '\t' => 's',
        '\r' => 'R',
        '\n' | '\u{C}' | '\u{2028}' | '\u{2029}' => 'e',
        '\u{30A1}'..='\u{30FA}' | '\u{30FC}'..='\u{30FE}' => 'a',
        '\u{3041}'..='\u{3094}' | '\u{309D}' | '\u{309E}' => 'h',
        _ if is(0) => return None,
        _ if is(6) => 'k',
        _ if is(1) => 'l',
        _ if is(2) => 'd',
        _ if is(3) => 'w',
        _ if is(4) => 'r',
        _ if is(5) => 's',
        _ => 'o',
    })
}

/// The JDK word rules over the class string; the longest match wins and a
/// single character is always a word.
static RULES: LazyLock<DFA> = LazyLock::new(|| {
    let word = r"l+(?:[wbp]l+)*x?";
    let number = r"d+(?:[bpc]d+)*";
    let patterns = [
        format!("(?:{word})?(?:{number}(?:{word}))*(?:{number}[qy]?)?"),
        format!("[pyr](?:{number}(?:{word}))*(?:{number}[qy]?)?"),
        r"s*R?e?".to_string(),
        "a*".to_string(),
        "h*".to_string(),
        "k*".to_string(),
    ];
    DFA::builder()
        .configure(DFA::config().match_kind(MatchKind::All))
        .build_many(&patterns)
        .expect("static patterns")
});

/// `boundary[i]` for `i` in `0..=len`: whether a word starts (or the text
/// ends) at character `i`.
fn word_boundaries(chars: &[char]) -> Vec<bool> {
    // Ignored characters stick to the preceding character.
    let mut classes = String::new();
    let mut index = Vec::new();
    for (i, &c) in chars.iter().enumerate() {
        if let Some(k) = class(c) {
            classes.push(k);
            index.push(i);
        }
    }
    let mut boundary = vec![false; chars.len() + 1];
    boundary[0] = true;
    boundary[chars.len()] = true;
    let mut cache = RULES.create_cache();
    let mut pos = 0;
    while pos < classes.len() {
        let input = Input::new(&classes).range(pos..).anchored(Anchored::Yes);
        let mut state = OverlappingState::start();
        let mut end = pos + 1;
        loop {
            RULES
                .try_search_overlapping_fwd(&mut cache, &input, &mut state)
                .expect("the word-break DFA never gives up");
            match state.get_match() {
                Some(m) => end = end.max(m.offset()),
                None => break,
            }
        }
        if end < classes.len() {
            boundary[index[end]] = true;
        }
        pos = end;
    }
    boundary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_sigma_follows_the_jdk() {
        // JDK 17: "ΣΑΣ".toLowerCase() == "σας"; digits and letters after the
        // sigma in the same word keep it medial; `_` and `-` join words.
        assert_eq!(to_lower_case("ΣΑΣ"), "σας");
        assert_eq!(to_lower_case("ΣΑΣ12D"), "σασ12d");
        assert_eq!(to_lower_case("ΣΑΣ."), "σας.");
        assert_eq!(to_lower_case("ab_Σ"), "ab_ς");
        assert_eq!(to_lower_case("ΑΣ-Σα"), "ασ-σα");
        assert_eq!(to_lower_case("1Σ_Σ"), "1σ_ς");
        assert_eq!(to_lower_case("İstanbul"), "i\u{307}stanbul");
    }
}
