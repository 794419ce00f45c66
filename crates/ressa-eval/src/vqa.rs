//! VQA accuracy (VQAv2, OK-VQA) and GQA exact match.
//!
//! Reference: `GT-Vision-Lab/VQA` `PythonEvaluationTools/vqaEvaluation/vqaEval.py`
//! (the Python 3 version on `master`), which `salesforce/LAVIS`
//! `lavis/common/vqa_tools/vqa_eval.py` copies verbatim. Every quirk of that
//! script is reproduced here on purpose, because published numbers were
//! produced with it:
//!
//! * The **prediction** is always normalised: `\n` and `\t` become spaces, the
//!   string is `strip()`ped, then [`process_punctuation`] and
//!   [`process_digit_article`] are applied.
//! * The **ground-truth answers** only get [`process_punctuation`], and only when
//!   the answers of the question are not all identical (`len(set(gtAnswers)) > 1`).
//! * Per question: for each ground-truth answer `g`, the other answers are the
//!   entries that are *not equal to `g` as whole JSON objects* (`item != gtAnsDatum`,
//!   a dict comparison, so answer ids normally make exactly one entry drop
//!   out); accuracy for that subset is `min(1, #matches / 3)`. The question's
//!   accuracy is the mean over all subsets (10 for VQAv2).
//! * Corpus accuracy is `100 * mean`; the script's printed/returned figure is
//!   `round(·, 2)`. Both are exposed ([`VqaCorpus::accuracy`] and
//!   [`VqaCorpus::accuracy_rounded`]).
//!
//! GQA (LAVIS `GQATask._report_metrics` with `inference_method == "generate"`):
//! `processPunctuation` + `processDigitArticle` on the prediction only (no
//! `\n`/`\t`/strip step), the ground truth is used as is, score = exact string
//! equality, accuracy = `100 * mean` (not rounded).
//!
//! OK-VQA: LAVIS lemmatises OK-VQA predictions with spaCy (`en_core_web_sm`,
//! NOUN and VERB tokens replaced by their lemma) inside the model's
//! `predict_answers`, i.e. *before* the answers reach the scorer. This crate does
//! **not** lemmatise; callers that need it pass an [`AnswerHook`] that rewrites
//! each prediction before scoring.

use std::{
    collections::HashSet,
    sync::{Arc, LazyLock},
};

use serde_json::{Map, Value};

use crate::pystr::{is_py_decimal, py_lower, py_round, py_split, py_strip};

/// A rewrite applied to every raw prediction before VQA normalisation
/// (e.g. a lemmatiser for OK-VQA).
pub type AnswerHook<'a> = &'a dyn Fn(&str) -> String;

/// `self.punct` of the Python 3 script (the Python 2 list differs: do not use it).
const PUNCT: [char; 21] = [
    ';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
    '?', '!',
];

/// `re.UNICODE` (== 32) is passed positionally to `periodStrip.sub`, where the
/// fourth positional parameter is `count`: at most 32 periods are removed.
const PERIOD_STRIP_COUNT: usize = 32;

/// `self.manualMap`.
fn manual_map(word: &str) -> Option<&'static str> {
    Some(match word {
        "none" | "zero" => "0",
        "one" => "1",
        "two" => "2",
        "three" => "3",
        "four" => "4",
        "five" => "5",
        "six" => "6",
        "seven" => "7",
        "eight" => "8",
        "nine" => "9",
        "ten" => "10",
        _ => return None,
    })
}

const ARTICLES: [&str; 3] = ["a", "an", "the"];

/// `self.contractions`, verbatim (including the entries with an upper-case `I`,
/// which can never match because the text is lower-cased first, and the odd
/// `"somebody'd": "somebodyd"`).
const CONTRACTIONS: [(&str, &str); 120] = [
    ("aint", "ain't"),
    ("arent", "aren't"),
    ("cant", "can't"),
    ("couldve", "could've"),
    ("couldnt", "couldn't"),
    ("couldn'tve", "couldn't've"),
    ("couldnt've", "couldn't've"),
    ("didnt", "didn't"),
    ("doesnt", "doesn't"),
    ("dont", "don't"),
    ("hadnt", "hadn't"),
    ("hadnt've", "hadn't've"),
    ("hadn'tve", "hadn't've"),
    ("hasnt", "hasn't"),
    ("havent", "haven't"),
    ("hed", "he'd"),
    ("hed've", "he'd've"),
    ("he'dve", "he'd've"),
    ("hes", "he's"),
    ("howd", "how'd"),
    ("howll", "how'll"),
    ("hows", "how's"),
    ("Id've", "I'd've"),
    ("I'dve", "I'd've"),
    ("Im", "I'm"),
    ("Ive", "I've"),
    ("isnt", "isn't"),
    ("itd", "it'd"),
    ("itd've", "it'd've"),
    ("it'dve", "it'd've"),
    ("itll", "it'll"),
    ("let's", "let's"),
    ("maam", "ma'am"),
    ("mightnt", "mightn't"),
    ("mightnt've", "mightn't've"),
    ("mightn'tve", "mightn't've"),
    ("mightve", "might've"),
    ("mustnt", "mustn't"),
    ("mustve", "must've"),
    ("neednt", "needn't"),
    ("notve", "not've"),
    ("oclock", "o'clock"),
    ("oughtnt", "oughtn't"),
    ("ow's'at", "'ow's'at"),
    ("'ows'at", "'ow's'at"),
    ("'ow'sat", "'ow's'at"),
    ("shant", "shan't"),
    ("shed've", "she'd've"),
    ("she'dve", "she'd've"),
    ("she's", "she's"),
    ("shouldve", "should've"),
    ("shouldnt", "shouldn't"),
    ("shouldnt've", "shouldn't've"),
    ("shouldn'tve", "shouldn't've"),
    ("somebody'd", "somebodyd"),
    ("somebodyd've", "somebody'd've"),
    ("somebody'dve", "somebody'd've"),
    ("somebodyll", "somebody'll"),
    ("somebodys", "somebody's"),
    ("someoned", "someone'd"),
    ("someoned've", "someone'd've"),
    ("someone'dve", "someone'd've"),
    ("someonell", "someone'll"),
    ("someones", "someone's"),
    ("somethingd", "something'd"),
    ("somethingd've", "something'd've"),
    ("something'dve", "something'd've"),
    ("somethingll", "something'll"),
    ("thats", "that's"),
    ("thered", "there'd"),
    ("thered've", "there'd've"),
    ("there'dve", "there'd've"),
    ("therere", "there're"),
    ("theres", "there's"),
    ("theyd", "they'd"),
    ("theyd've", "they'd've"),
    ("they'dve", "they'd've"),
    ("theyll", "they'll"),
    ("theyre", "they're"),
    ("theyve", "they've"),
    ("twas", "'twas"),
    ("wasnt", "wasn't"),
    ("wed've", "we'd've"),
    ("we'dve", "we'd've"),
    ("weve", "we've"),
    ("werent", "weren't"),
    ("whatll", "what'll"),
    ("whatre", "what're"),
    ("whats", "what's"),
    ("whatve", "what've"),
    ("whens", "when's"),
    ("whered", "where'd"),
    ("wheres", "where's"),
    ("whereve", "where've"),
    ("whod", "who'd"),
    ("whod've", "who'd've"),
    ("who'dve", "who'd've"),
    ("wholl", "who'll"),
    ("whos", "who's"),
    ("whove", "who've"),
    ("whyll", "why'll"),
    ("whyre", "why're"),
    ("whys", "why's"),
    ("wont", "won't"),
    ("wouldve", "would've"),
    ("wouldnt", "wouldn't"),
    ("wouldnt've", "wouldn't've"),
    ("wouldn'tve", "wouldn't've"),
    ("yall", "y'all"),
    ("yall'll", "y'all'll"),
    ("y'allll", "y'all'll"),
    ("yall'd've", "y'all'd've"),
    ("y'alld've", "y'all'd've"),
    ("y'all'dve", "y'all'd've"),
    ("youd", "you'd"),
    ("youd've", "you'd've"),
    ("you'dve", "you'd've"),
    ("youll", "you'll"),
    ("youre", "you're"),
    ("youve", "you've"),
];

fn contraction(word: &str) -> Option<&'static str> {
    CONTRACTIONS
        .iter()
        .find(|(k, _)| *k == word)
        .map(|(_, v)| *v)
}

/// `re.search(r"(\d)(,)(\d)", text) != None`, with Python's Unicode `\d`.
fn has_digit_comma_digit(text: &str) -> bool {
    let chars: Vec<char> = text.chars().collect();
    chars
        .windows(3)
        .any(|w| w[1] == ',' && is_py_decimal(w[0]) && is_py_decimal(w[2]))
}

/// `processPunctuation(inText)`.
///
/// For each punctuation character `p` (in list order): if `p + " "` or
/// `" " + p` occurs in the **original** text, or the original text contains a
/// digit-comma-digit sequence anywhere, every `p` is deleted; otherwise every
/// `p` is replaced by a space. Then
/// `re.compile(r"(?!<=\d)(\.)(?!\d)").sub("", text, re.UNICODE)` runs: the
/// leading group is a *negative lookahead* for the two characters `<=` followed
/// by a digit (a typo for the lookbehind `(?<!\d)`), which can never fail in
/// front of a `.`, so the pattern is simply "a `.` not followed by a Unicode
/// digit"; and `re.UNICODE` lands in the `count` parameter, so only the first
/// 32 such periods are removed. The lookahead looks at the string being scanned
/// (before any removal), as `re.sub` does.
pub fn process_punctuation(in_text: &str) -> String {
    let comma_digits = has_digit_comma_digit(in_text);
    let mut out = in_text.to_string();
    for p in PUNCT {
        let mut with_space_after = String::with_capacity(2);
        with_space_after.push(p);
        with_space_after.push(' ');
        let mut with_space_before = String::with_capacity(2);
        with_space_before.push(' ');
        with_space_before.push(p);
        let delete = in_text.contains(&with_space_after)
            || in_text.contains(&with_space_before)
            || comma_digits;
        if out.contains(p) {
            out = out.replace(p, if delete { "" } else { " " });
        }
    }
    strip_periods(&out, PERIOD_STRIP_COUNT)
}

/// Remove the first `count` periods that are not followed by a Unicode digit.
fn strip_periods(text: &str, count: usize) -> String {
    let mut out = String::with_capacity(text.len());
    let mut removed = 0;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '.' && removed < count && !chars.peek().is_some_and(|&n| is_py_decimal(n)) {
            removed += 1;
            continue;
        }
        out.push(c);
    }
    out
}

/// `processDigitArticle(inText)`: lower-case, split on whitespace, map number
/// words (`none`/`zero`..`ten`) to digits, drop the articles `a`, `an`, `the`,
/// expand the contraction table, join with single spaces.
pub fn process_digit_article(in_text: &str) -> String {
    let lowered = py_lower(in_text);
    let words: Vec<&str> = py_split(&lowered)
        .map(|w| manual_map(w).unwrap_or(w))
        .filter(|w| !ARTICLES.contains(w))
        .map(|w| contraction(w).unwrap_or(w))
        .collect();
    words.join(" ")
}

/// The normalisation `evaluate()` applies to a VQA prediction (`resAns`).
pub fn normalize_vqa_prediction(answer: &str) -> String {
    let replaced = answer.replace(['\n', '\t'], " ");
    let stripped = py_strip(&replaced);
    process_digit_article(&process_punctuation(stripped))
}

/// The normalisation LAVIS `GQATask` applies to a GQA prediction.
pub fn normalize_gqa_prediction(answer: &str) -> String {
    process_digit_article(&process_punctuation(answer))
}

/// One ground-truth answer entry of an official VQA annotation
/// (`{"answer": ..., "answer_confidence": ..., "answer_id": ...}`).
///
/// All fields take part in the leave-one-out comparison (`item != gtAnsDatum`
/// compares whole dicts). The fields other than `answer` are kept as one
/// canonical JSON string ([`canonical_fields`]) so that Python-equal dicts
/// have equal strings; entries share the string when they are equal, which
/// keeps the 2 million answers of VQAv2 val small in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GtAnswer {
    /// The `answer` string.
    pub answer: String,
    /// The other fields, canonicalised.
    pub rest: Arc<str>,
}

impl GtAnswer {
    /// An entry with only an `answer` field.
    pub fn new(answer: impl Into<String>) -> Self {
        static EMPTY: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("{}"));
        Self {
            answer: answer.into(),
            rest: EMPTY.clone(),
        }
    }

    /// An entry with an `answer` and other fields.
    pub fn with_fields(answer: impl Into<String>, fields: &Map<String, Value>) -> Self {
        Self {
            answer: answer.into(),
            rest: Arc::from(canonical_fields(fields)),
        }
    }

    /// Python `==` between two answer dicts.
    fn py_eq(&self, other: &Self) -> bool {
        self.answer == other.answer
            && (Arc::ptr_eq(&self.rest, &other.rest) || self.rest == other.rest)
    }
}

/// A canonical JSON text for a dict of fields: keys sorted, and values that
/// Python considers equal written the same way (`1`, `1.0` and `true` all
/// become `1`; `false` and `0.0` become `0`).
pub fn canonical_fields(fields: &Map<String, Value>) -> String {
    fn write(v: &Value, out: &mut String) {
        match v {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push(if *b { '1' } else { '0' }),
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    out.push_str(&i.to_string());
                } else if let Some(u) = n.as_u64() {
                    out.push_str(&u.to_string());
                } else {
                    let x = n.as_f64().unwrap_or(f64::NAN);
                    if x.fract() == 0.0 && x.abs() < 9.0e15 {
                        out.push_str(&(x as i64).to_string());
                    } else {
                        out.push_str(&format!("{x:?}"));
                    }
                }
            }
            Value::String(s) => out.push_str(&Value::String(s.clone()).to_string()),
            Value::Array(a) => {
                out.push('[');
                for (k, x) in a.iter().enumerate() {
                    if k > 0 {
                        out.push(',');
                    }
                    write(x, out);
                }
                out.push(']');
            }
            Value::Object(m) => write_map(m, out),
        }
    }
    fn write_map(m: &Map<String, Value>, out: &mut String) {
        let mut keys: Vec<&String> = m.keys().collect();
        keys.sort();
        out.push('{');
        for (k, key) in keys.into_iter().enumerate() {
            if k > 0 {
                out.push(',');
            }
            out.push_str(&Value::String(key.clone()).to_string());
            out.push(':');
            write(&m[key], out);
        }
        out.push('}');
    }
    let mut out = String::new();
    write_map(fields, &mut out);
    out
}

/// Accuracy of one question in `[0, 1]` (the script's `avgGTAcc`), given the raw
/// prediction and the raw ground-truth answer entries.
///
/// Returns `None` when there are no ground-truth answers (the script would
/// divide by zero).
pub fn vqa_question_accuracy(prediction: &str, gt: &[GtAnswer]) -> Option<f64> {
    if gt.is_empty() {
        return None;
    }
    let res_ans = normalize_vqa_prediction(prediction);
    let distinct: HashSet<&str> = gt.iter().map(|a| a.answer.as_str()).collect();
    let processed: Vec<GtAnswer> = if distinct.len() > 1 {
        gt.iter()
            .map(|a| GtAnswer {
                answer: process_punctuation(&a.answer),
                rest: Arc::clone(&a.rest),
            })
            .collect()
    } else {
        gt.to_vec()
    };
    let mut total = 0.0;
    for held_out in &processed {
        let matching = processed
            .iter()
            .filter(|item| !item.py_eq(held_out) && item.answer == res_ans)
            .count();
        // min(1, float(len(matchingAns))/3)
        total += f64::min(1.0, matching as f64 / 3.0);
    }
    Some(total / processed.len() as f64)
}

/// GQA exact match of one question: `1.0` or `0.0`.
pub fn gqa_question_accuracy(prediction: &str, gt_answer: &str) -> f64 {
    if normalize_gqa_prediction(prediction) == gt_answer {
        1.0
    } else {
        0.0
    }
}

/// Corpus VQA accuracy as `setAccuracy` computes it.
#[derive(Debug, Clone, PartialEq)]
pub struct VqaCorpus {
    /// Per-question accuracy in `[0, 1]`, in input order.
    pub per_question: Vec<f64>,
    /// `100 * sum / n`, unrounded.
    pub accuracy: f64,
    /// `round(100 * sum / n, 2)`: the figure the official script reports.
    pub accuracy_rounded: f64,
}

impl VqaCorpus {
    /// Aggregate per-question accuracies (in `[0, 1]`), summing in input order
    /// like Python's `sum(accQA)`.
    pub fn from_per_question(per_question: Vec<f64>) -> Self {
        let n = per_question.len();
        let sum: f64 = per_question.iter().sum();
        let accuracy = if n == 0 {
            f64::NAN
        } else {
            100.0 * sum / n as f64
        };
        Self {
            per_question,
            accuracy,
            accuracy_rounded: py_round(accuracy, 2),
        }
    }
}

/// The per-question figure the script stores in `evalQA`: `round(100 * acc, 2)`.
pub fn per_question_rounded(acc: f64) -> f64 {
    py_round(100.0 * acc, 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn punctuation_quirks() {
        // no "p " / " p" and no digit,digit: punctuation becomes a space
        assert_eq!(process_punctuation("yes/no"), "yes no");
        // "? " occurs: every "?" deleted
        assert_eq!(process_punctuation("what? why?"), "what why");
        // a digit-comma-digit anywhere deletes all punctuation of the list
        assert_eq!(process_punctuation("1,000 (approx)"), "1000 approx");
        // periods: removed unless followed by a digit
        assert_eq!(process_punctuation("a.b 2.5 .5 end."), "ab 2.5 .5 end");
        // at most 32 periods are removed
        let dots = ".".repeat(40);
        assert_eq!(process_punctuation(&dots), ".".repeat(8));
        // Unicode digits count as digits for both regexes
        assert_eq!(
            process_punctuation("\u{0663}.\u{0664}"),
            "\u{0663}.\u{0664}"
        );
        assert_eq!(
            process_punctuation("\u{0663},\u{0664} a-b"),
            "\u{0663}\u{0664} ab"
        );
    }

    #[test]
    fn digit_article() {
        assert_eq!(process_digit_article("The Two DOGS"), "2 dogs");
        assert_eq!(process_digit_article("  a dont  "), "don't");
        assert_eq!(process_digit_article("Im"), "im");
        assert_eq!(process_digit_article("none"), "0");
    }

    #[test]
    fn python_dict_equality() {
        let f = |v: serde_json::Value| canonical_fields(v.as_object().unwrap());
        assert_eq!(
            f(serde_json::json!({"b": 1, "a": true})),
            f(serde_json::json!({"a": 1.0, "b": 1}))
        );
        assert_ne!(
            f(serde_json::json!({"a": 1})),
            f(serde_json::json!({"a": "1"}))
        );
        assert_ne!(
            f(serde_json::json!({"a": 1})),
            f(serde_json::json!({"a": 1.5}))
        );
        assert_eq!(f(serde_json::json!({})), "{}");
    }

    #[test]
    fn leave_one_out() {
        let gt: Vec<GtAnswer> = (0..10)
            .map(|i| {
                let mut fields = Map::new();
                fields.insert("answer_id".into(), Value::from(i + 1));
                GtAnswer::with_fields(if i < 2 { "yes" } else { "no" }, &fields)
            })
            .collect();
        // "yes" twice: 8 subsets see 2 matches (2/3), 2 subsets see 1 (1/3)
        let acc = vqa_question_accuracy("Yes", &gt).unwrap();
        assert!((acc - (8.0 * 2.0 / 3.0 + 2.0 / 3.0) / 10.0).abs() < 1e-15);
        assert_eq!(vqa_question_accuracy("no", &gt), Some(1.0));
        // identical dicts drop out together (no answer ids): 0 matches left
        let same = vec![GtAnswer::new("yes"); 10];
        assert_eq!(vqa_question_accuracy("yes", &same), Some(0.0));
    }
}
