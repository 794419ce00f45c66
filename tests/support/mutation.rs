//! Shared by the `mutated_inputs` property tests of ressa-models, ressa-data and ressa-train
//! (included with `#[path]`): the proptest settings, the panic guard that turns a panic into a
//! test failure naming its location, and the byte mutations; [`json`] adds the JSON value
//! mutations the model and data tests use.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{RngSeed, TestCaseError};

pub fn config() -> ProptestConfig {
    let default = ProptestConfig::default();
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(48),
        rng_seed: match std::env::var("PROPTEST_RNG_SEED") {
            Ok(_) => default.rng_seed,
            Err(_) => RngSeed::Fixed(0x0072_6573_7361),
        },
        failure_persistence: None,
        max_shrink_iters: 512,
        ..default
    }
}

// --- Panics become test failures with their message and location. ---------------------------

pub static GUARDED: AtomicUsize = AtomicUsize::new(0);
pub static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

pub fn setup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if GUARDED.load(Ordering::SeqCst) == 0 {
                return default(info);
            }
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(non-string payload)".into());
            let at = info
                .location()
                .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
                .unwrap_or_default();
            // Where in our sources, when the panic is raised in std or a dependency.
            let ours = std::backtrace::Backtrace::force_capture()
                .to_string()
                .lines()
                .map(str::trim)
                .find(|l| {
                    l.starts_with("at ")
                        && !l.contains("/rustc/")
                        && !l.contains("/.cargo/")
                        && !l.contains("tests/")
                })
                .map(|l| format!(" (from {})", &l[3..]))
                .filter(|_| at.contains("/rustc/") || at.contains("/.cargo/"))
                .unwrap_or_default();
            *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(format!("panicked at {at}{ours}: {msg}"));
        }));
        // Best effort: an unchecked absurd allocation aborts instead of exhausting memory.
        let _ = std::process::Command::new("prlimit")
            .arg(format!("--pid={}", std::process::id()))
            .arg(format!("--as={}", 16u64 << 30))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    });
}

/// Runs `f`, turning a panic into a failure that says where it happened.
pub fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, TestCaseError> {
    setup();
    GUARDED.fetch_add(1, Ordering::SeqCst);
    let r = catch_unwind(AssertUnwindSafe(f));
    GUARDED.fetch_sub(1, Ordering::SeqCst);
    r.map_err(|_| {
        let msg = LAST_PANIC
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_else(|| "panicked".into());
        TestCaseError::fail(format!("{what}: {msg}"))
    })
}

/// Records the input about to be loaded (read it after an abort).
pub fn record(test: &str, input: &dyn std::fmt::Debug) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("mutated_inputs");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join(format!("{test}.last")), format!("{input:#?}\n"));
}

// --- Byte mutations. -----------------------------------------------------------------------

#[derive(Debug, Clone)]
pub enum ByteEdit {
    Flip { at: Index, bit: u8 },
    Overwrite { at: Index, bytes: Vec<u8> },
    Insert { at: Index, bytes: Vec<u8> },
    Delete { at: Index, len: usize },
    Truncate { at: Index },
}

/// Bytes that mean something to JSON and number parsers, or are plain garbage.
pub fn interesting_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 1..16),
        prop::sample::select(vec![
            &b"{"[..],
            b"}",
            b"[",
            b"]",
            b"\"",
            b":",
            b",",
            b"\\",
            b"0",
            b"-1",
            b"1e308",
            b"null",
            b"18446744073709551615",
            b"\xff\xfe",
            b"\0",
        ])
        .prop_map(|b| b.to_vec()),
    ]
}

pub fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(at, bit)| ByteEdit::Flip { at, bit }),
        3 => (any::<Index>(), interesting_bytes())
            .prop_map(|(at, bytes)| ByteEdit::Overwrite { at, bytes }),
        2 => (any::<Index>(), interesting_bytes())
            .prop_map(|(at, bytes)| ByteEdit::Insert { at, bytes }),
        1 => (any::<Index>(), 1usize..64).prop_map(|(at, len)| ByteEdit::Delete { at, len }),
        1 => any::<Index>().prop_map(|at| ByteEdit::Truncate { at }),
    ]
}

/// Applies `edit` inside `bytes[..region]` (the whole file when `region` is its length);
/// returns what it did, in words.
pub fn apply_bytes(bytes: &mut Vec<u8>, region: usize, edit: &ByteEdit) -> String {
    let region = region.min(bytes.len());
    if region == 0 {
        if let ByteEdit::Insert { bytes: b, .. } = edit {
            bytes.splice(0..0, b.iter().copied());
            return format!("insert {b:?} at 0");
        }
        return "nothing (empty file)".into();
    }
    match edit {
        ByteEdit::Flip { at, bit } => {
            let i = at.index(region);
            bytes[i] ^= 1 << bit;
            format!("flip bit {bit} of byte {i}")
        }
        ByteEdit::Overwrite { at, bytes: b } => {
            let i = at.index(region);
            for (k, v) in b.iter().enumerate() {
                if let Some(x) = bytes.get_mut(i + k) {
                    *x = *v;
                }
            }
            format!(
                "overwrite bytes {i}.. with {:?}",
                String::from_utf8_lossy(b)
            )
        }
        ByteEdit::Insert { at, bytes: b } => {
            let i = at.index(region + 1);
            bytes.splice(i..i, b.iter().copied());
            format!("insert {:?} at {i}", String::from_utf8_lossy(b))
        }
        ByteEdit::Delete { at, len } => {
            let i = at.index(region);
            let end = (i + len).min(bytes.len());
            bytes.drain(i..end);
            format!("delete bytes {i}..{end}")
        }
        ByteEdit::Truncate { at } => {
            let i = at.index(region);
            bytes.truncate(i);
            format!("truncate to {i} bytes")
        }
    }
}

/// JSON value mutations and whole-file mutations of JSON files.
pub mod json {
    use super::*;
    use serde_json::{Value, json};
    // --- JSON value mutations. -----------------------------------------------------------------

    #[derive(Debug, Clone)]
    pub enum JsonEdit {
        /// Replaces the node at a position (in document order) with a value.
        Replace { at: Index, with: Value },
        /// Removes the node from its object or array.
        Remove { at: Index },
        /// Renames the node's key in its object.
        Rename { at: Index, to: String },
    }

    pub fn hostile_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            prop::sample::select(vec![
                json!(0),
                json!(1),
                json!(-1),
                json!(2),
                json!(3),
                json!(7),
                json!(1u64 << 31),
                json!(1u64 << 53),
                json!(u64::MAX),
                json!(i64::MIN),
                json!(0.5),
                json!(-0.0),
                json!(1e300),
                json!(""),
                json!("x"),
                json!("../x.safetensors"),
                json!("/etc/hostname"),
                Value::Null,
                json!(true),
                json!([]),
                json!({}),
                json!([0]),
            ]),
            any::<i32>().prop_map(|i| json!(i)),
        ]
    }

    pub fn json_edit() -> impl Strategy<Value = JsonEdit> {
        prop_oneof![
            5 => (any::<Index>(), hostile_value()).prop_map(|(at, with)| JsonEdit::Replace { at, with }),
            2 => any::<Index>().prop_map(|at| JsonEdit::Remove { at }),
            1 => (
                any::<Index>(),
                prop::sample::select(vec!["", "zebra", "\u{0}", "<image>", "model_type", "ü"])
            )
                .prop_map(|(at, to)| JsonEdit::Rename { at, to: to.to_string() }),
        ]
    }

    /// JSON pointers of every node, in document order.
    pub fn pointers(v: &Value, at: &str, out: &mut Vec<String>) {
        out.push(at.to_string());
        let esc = |k: &str| k.replace('~', "~0").replace('/', "~1");
        match v {
            Value::Object(m) => {
                for (k, c) in m {
                    pointers(c, &format!("{at}/{}", esc(k)), out);
                }
            }
            Value::Array(a) => {
                for (i, c) in a.iter().enumerate() {
                    pointers(c, &format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
    }

    pub fn unescape(t: &str) -> String {
        t.replace("~1", "/").replace("~0", "~")
    }

    /// Applies `edit`; returns what it did, in words.
    pub fn apply_json(v: &mut Value, edit: &JsonEdit) -> String {
        let mut ps = Vec::new();
        pointers(v, "", &mut ps);
        let pick = |at: &Index| ps[at.index(ps.len())].clone();
        match edit {
            JsonEdit::Replace { at, with } => {
                let p = pick(at);
                if let Some(node) = v.pointer_mut(&p) {
                    *node = with.clone();
                }
                format!("set `{p}` to {with}")
            }
            JsonEdit::Remove { at } | JsonEdit::Rename { at, .. } => {
                let p = pick(at);
                let Some((parent, last)) = p.rsplit_once('/') else {
                    return "nothing (the root)".into();
                };
                let key = unescape(last);
                match (v.pointer_mut(parent), edit) {
                    (Some(Value::Object(m)), JsonEdit::Remove { .. }) => {
                        m.remove(&key);
                    }
                    (Some(Value::Object(m)), JsonEdit::Rename { to, .. }) => {
                        if let Some(x) = m.remove(&key) {
                            m.insert(to.clone(), x);
                        }
                    }
                    (Some(Value::Array(a)), JsonEdit::Remove { .. }) => {
                        if let Ok(i) = key.parse::<usize>()
                            && i < a.len()
                        {
                            a.remove(i);
                        }
                    }
                    _ => {}
                }
                match edit {
                    JsonEdit::Rename { to, .. } => format!("rename `{p}` to {to:?}"),
                    _ => format!("remove `{p}`"),
                }
            }
        }
    }

    /// A file mutated either byte-wise or value-wise (JSON files).
    #[derive(Debug, Clone)]
    pub enum Mutation {
        Bytes(Vec<ByteEdit>),
        Json(Vec<JsonEdit>),
    }

    pub fn json_file_mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            prop::collection::vec(byte_edit(), 1..4).prop_map(Mutation::Bytes),
            prop::collection::vec(json_edit(), 1..4).prop_map(Mutation::Json),
        ]
    }

    /// The mutated bytes and what was done, in words.
    pub fn mutate(original: &[u8], m: &Mutation) -> (Vec<u8>, String) {
        let mut done = Vec::new();
        let bytes = match m {
            Mutation::Bytes(edits) => {
                let mut b = original.to_vec();
                for e in edits {
                    let n = b.len();
                    done.push(apply_bytes(&mut b, n, e));
                }
                b
            }
            Mutation::Json(edits) => {
                let mut v: Value = serde_json::from_slice(original).expect("fixture is JSON");
                for e in edits {
                    done.push(apply_json(&mut v, e));
                }
                serde_json::to_vec_pretty(&v).unwrap()
            }
        };
        (bytes, done.join("; "))
    }
}
