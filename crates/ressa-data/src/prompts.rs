//! Prompt templates and LAVIS' text processors (`blip_question`, `blip_caption` in
//! `lavis/processors/blip_processors.py`).
//!
//! | Task | Prompt (fed to both the Q-Former and T5) | Source |
//! |---|---|---|
//! | VQAv2, OK-VQA, GQA | [`VQA_PROMPT`] with the processed question | LAVIS `predict_answers`, reference §9 |
//! | NoCaps, COCO caption (InstructBLIP evaluation) | [`NOCAPS_PROMPT`] (empty) | reference §9 |
//! | COCO caption (BLIP-2 configs) | [`CAPTION_PROMPT`] | LAVIS `caption_coco_*` configs |

/// The VQA template: `{}` is replaced by the question processed with [`pre_question`].
pub const VQA_PROMPT: &str = "Question: {} Short answer:";

/// The captioning prompt of LAVIS' BLIP-2 caption configs (`prompt: "a photo of"`).
pub const CAPTION_PROMPT: &str = "a photo of";

/// NoCaps (and InstructBLIP captioning in the reference loops) use no prompt.
pub const NOCAPS_PROMPT: &str = "";

/// LAVIS' `max_words` default for both processors.
pub const MAX_WORDS: usize = 50;

/// Characters LAVIS removes (questions) or turns into spaces (captions): `[.!"()*#:;~]`.
fn is_lavis_punct(c: char) -> bool {
    matches!(c, '.' | '!' | '"' | '(' | ')' | '*' | '#' | ':' | ';' | '~')
}

/// Python's `str.isspace` / `re` `\s` for `str` patterns: Unicode `White_Space` plus the
/// information separators U+001C..U+001F.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `" ".join(s.split(" ")[:max_words])` when there are more than `max_words` pieces (Python
/// `split(" ")` keeps empty pieces between repeated spaces).
fn truncate_words(s: String, max_words: usize) -> String {
    let pieces: Vec<&str> = s.split(' ').collect();
    if pieces.len() > max_words {
        pieces[..max_words].join(" ")
    } else {
        s
    }
}

/// `BlipQuestionProcessor.pre_question`: lowercase, delete `[.!"()*#:;~]`, strip trailing
/// spaces, keep the first `max_words` space-separated words.
pub fn pre_question(question: &str, max_words: usize) -> String {
    let q: String = question
        .to_lowercase()
        .chars()
        .filter(|&c| !is_lavis_punct(c))
        .collect();
    let q = q.trim_end_matches(' ').to_string();
    truncate_words(q, max_words)
}

/// `BlipCaptionProcessor.pre_caption` (without its prompt prefix): lowercase, `[.!"()*#:;~]`
/// → space, runs of two or more whitespace characters → one space, strip trailing newlines
/// then surrounding spaces, keep the first `max_words` words.
pub fn pre_caption(caption: &str, max_words: usize) -> String {
    let lowered: String = caption
        .to_lowercase()
        .chars()
        .map(|c| if is_lavis_punct(c) { ' ' } else { c })
        .collect();
    // re.sub(r"\s{2,}", " ", caption): a run of length >= 2 becomes one space; a single
    // whitespace character (a tab, say) is kept as is.
    let chars: Vec<char> = lowered.chars().collect();
    let mut collapsed = String::with_capacity(lowered.len());
    let mut i = 0;
    while i < chars.len() {
        if is_py_space(chars[i]) {
            let mut j = i;
            while j < chars.len() && is_py_space(chars[j]) {
                j += 1;
            }
            if j - i >= 2 {
                collapsed.push(' ');
            } else {
                collapsed.push(chars[i]);
            }
            i = j;
        } else {
            collapsed.push(chars[i]);
            i += 1;
        }
    }
    let c = collapsed
        .trim_end_matches('\n')
        .trim_matches(' ')
        .to_string();
    truncate_words(c, max_words)
}

/// Number of `{}` placeholders in a template (`{{` and `}}` are literal braces, as in
/// Python's `str.format`).
pub fn placeholders(template: &str) -> usize {
    template
        .replace("{{", "")
        .replace("}}", "")
        .matches("{}")
        .count()
}

/// `template.format(arg)` for templates with at most one `{}` (Python `str.format`: `{{` and
/// `}}` become literal braces; a template without `{}` is returned as is).
pub fn fill(template: &str, arg: &str) -> String {
    let mut out = String::with_capacity(template.len() + arg.len());
    let mut rest = template;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("{{") {
            out.push('{');
            rest = r;
        } else if let Some(r) = rest.strip_prefix("}}") {
            out.push('}');
            rest = r;
        } else if let Some(r) = rest.strip_prefix("{}") {
            out.push_str(arg);
            rest = r;
        } else {
            let c = rest.chars().next().expect("non-empty");
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// The VQA prompt for a raw question: `Question: {pre_question(q)} Short answer:`.
pub fn vqa_prompt(question: &str) -> String {
    fill(VQA_PROMPT, &pre_question(question, MAX_WORDS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn questions_as_lavis_processes_them() {
        // re.sub(r'([.!"()*#:;~])', '', q.lower()).rstrip(' ')
        assert_eq!(
            pre_question("What's the man (on the left) holding?  ", 50),
            "what's the man on the left holding?"
        );
        assert_eq!(pre_question("Is it 3.5 m. long!", 50), "is it 35 m long");
        assert_eq!(pre_question("a  b c d", 3), "a  b");
        assert_eq!(pre_question("", 50), "");
        assert_eq!(
            vqa_prompt("What COLOR is it?"),
            "Question: what color is it? Short answer:"
        );
    }

    #[test]
    fn captions_as_lavis_processes_them() {
        assert_eq!(
            pre_caption("  A Dog: running...   on the beach!\n", 50),
            "a dog running on the beach"
        );
        // A single tab is not a run of two and stays; a tab next to a space collapses.
        assert_eq!(pre_caption("a\tb \tc", 50), "a\tb c");
        assert_eq!(pre_caption("one two three four", 2), "one two");
        assert_eq!(pre_caption("ÉCOLE (Paris)", 50), "école paris");
        assert_eq!(pre_caption("...", 50), "");
    }

    #[test]
    fn templates_fill_like_str_format() {
        assert_eq!(fill(VQA_PROMPT, "why"), "Question: why Short answer:");
        assert_eq!(fill("{{x}} {}", "y"), "{x} y");
        assert_eq!(fill(NOCAPS_PROMPT, "ignored"), "");
        assert_eq!(fill(CAPTION_PROMPT, "ignored"), "a photo of");
        assert_eq!(placeholders(VQA_PROMPT), 1);
        assert_eq!(placeholders("{{}}"), 0);
        assert_eq!(placeholders("{} and {}"), 2);
    }
}
