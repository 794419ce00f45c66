//! Property tests: `RepairConfig::from_toml` takes any bytes. A complete repair configuration
//! (every table and field) is mutated at random — bits flipped, bytes overwritten, garbage
//! inserted, ranges deleted, truncation; TOML values replaced by hostile ones (0, -1, huge
//! integers, NaN, ±inf, empty strings, wrong types), removed, keys renamed — and read; a
//! configuration that reads is validated, and one that validates gives a finite, non-negative
//! learning rate at every step. Nothing panics.
//!
//! The input being read is written to `$CARGO_TARGET_TMPDIR/mutated_inputs/<test>.last`
//! first, so an abort still names it.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{RngSeed, TestCaseError};
use ressa_train::repair::RepairConfig;

/// 48 cases per property, the same ones every run (`PROPTEST_CASES=N` runs more,
/// `PROPTEST_RNG_SEED=S` others).
fn config() -> ProptestConfig {
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

/// A repair configuration with every field set.
const BASE: &str = r#"pruned = "out/wanda-50"
dense = "models/instructblip"
out = "out/wanda-50-ressa"
checkpoints = "out/ckpt"

[data]
train = "data/cc3m/train.json"
images = "data/cc3m/images"
val = "data/cc3m/val.json"
caption_prompt = "a photo of"
max_examples = 1000

[train]
steps = 390
batch_size = 8
grad_accum = 2
lr = 1e-4
min_lr = 1e-6
warmup_steps = 10
schedule = "cosine"
clip_grad_norm = 1.0
seed = 3
augment = true
val_every = 50
checkpoint_every = 25
keep_checkpoints = 2

[train.adamw]
beta1 = 0.9
beta2 = 0.999
epsilon = 1e-8
weight_decay = 0.0

[train.distill]
lambda = 0.1
temperature = 2.0
reduction = "token-mean"

[train.adapters.vision]
rank = 4
alpha = 16.0

[train.adapters.qformer]
rank = 2
alpha = 16.0

[train.adapters.language]
rank = 8
alpha = 16.0
"#;

// --- Panics become test failures with their message and location. ---------------------------

static GUARDED: AtomicUsize = AtomicUsize::new(0);
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

fn setup() {
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
fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, TestCaseError> {
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
fn record(test: &str, input: &dyn std::fmt::Debug) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("mutated_inputs");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join(format!("{test}.last")), format!("{input:#?}\n"));
}

// --- Byte mutations. -----------------------------------------------------------------------

#[derive(Debug, Clone)]
enum ByteEdit {
    Flip { at: Index, bit: u8 },
    Overwrite { at: Index, bytes: Vec<u8> },
    Insert { at: Index, bytes: Vec<u8> },
    Delete { at: Index, len: usize },
    Truncate { at: Index },
}

/// Bytes that mean something to JSON and number parsers, or are plain garbage.
fn interesting_bytes() -> impl Strategy<Value = Vec<u8>> {
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

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
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
fn apply_bytes(bytes: &mut Vec<u8>, region: usize, edit: &ByteEdit) -> String {
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

// --- TOML value mutations. -----------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Seg {
    Key(String),
    At(usize),
}

#[derive(Debug, Clone)]
enum TomlEdit {
    /// Replaces the value at a position (in document order).
    Replace { at: Index, with: toml::Value },
    /// Removes the value from its table or array.
    Remove { at: Index },
    /// Renames the value's key in its table.
    Rename { at: Index, to: String },
}

fn hostile_value() -> impl Strategy<Value = toml::Value> {
    use toml::Value as V;
    prop_oneof![
        prop::sample::select(vec![
            V::Integer(0),
            V::Integer(1),
            V::Integer(-1),
            V::Integer(1 << 31),
            V::Integer(1 << 53),
            V::Integer(i64::MAX),
            V::Integer(i64::MIN),
            V::Float(0.0),
            V::Float(-0.5),
            V::Float(1.5),
            V::Float(1e300),
            V::Float(5e-324),
            V::Float(f64::NAN),
            V::Float(f64::INFINITY),
            V::Float(f64::NEG_INFINITY),
            V::String(String::new()),
            V::String("x".into()),
            V::String("reference".into()),
            V::String("constant".into()),
            V::String("../../etc".into()),
            V::Boolean(false),
            V::Array(vec![]),
            V::Table(toml::Table::new()),
        ]),
        any::<i32>().prop_map(|i| V::Integer(i as i64)),
    ]
}

fn toml_edit() -> impl Strategy<Value = TomlEdit> {
    prop_oneof![
        5 => (any::<Index>(), hostile_value()).prop_map(|(at, with)| TomlEdit::Replace { at, with }),
        2 => any::<Index>().prop_map(|at| TomlEdit::Remove { at }),
        1 => (
            any::<Index>(),
            prop::sample::select(vec!["stepz", "steps", "train", "", "lr"])
        )
            .prop_map(|(at, to)| TomlEdit::Rename { at, to: to.to_string() }),
    ]
}

fn paths(v: &toml::Value, at: &[Seg], out: &mut Vec<Vec<Seg>>) {
    out.push(at.to_vec());
    match v {
        toml::Value::Table(t) => {
            for (k, c) in t {
                let mut p = at.to_vec();
                p.push(Seg::Key(k.clone()));
                paths(c, &p, out);
            }
        }
        toml::Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                let mut p = at.to_vec();
                p.push(Seg::At(i));
                paths(c, &p, out);
            }
        }
        _ => {}
    }
}

fn get_mut<'a>(v: &'a mut toml::Value, path: &[Seg]) -> Option<&'a mut toml::Value> {
    let mut cur = v;
    for seg in path {
        cur = match (cur, seg) {
            (toml::Value::Table(t), Seg::Key(k)) => t.get_mut(k)?,
            (toml::Value::Array(a), Seg::At(i)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn show(path: &[Seg]) -> String {
    path.iter()
        .map(|s| match s {
            Seg::Key(k) => k.clone(),
            Seg::At(i) => i.to_string(),
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Applies `edit`; returns what it did, in words.
fn apply_toml(v: &mut toml::Value, edit: &TomlEdit) -> String {
    let mut ps = Vec::new();
    paths(v, &[], &mut ps);
    let (TomlEdit::Replace { at, .. } | TomlEdit::Remove { at } | TomlEdit::Rename { at, .. }) =
        edit;
    let path = ps[at.index(ps.len())].clone();
    let Some((last, parent)) = path.split_last() else {
        return "nothing (the root)".into();
    };
    let Some(container) = get_mut(v, parent) else {
        return "nothing".into();
    };
    match (container, last, edit) {
        (c, _, TomlEdit::Replace { with, .. }) => {
            if let Some(node) = get_mut(c, std::slice::from_ref(last)) {
                *node = with.clone();
            }
            format!("set `{}` to {with:?}", show(&path))
        }
        (toml::Value::Table(t), Seg::Key(k), TomlEdit::Remove { .. }) => {
            t.remove(k);
            format!("remove `{}`", show(&path))
        }
        (toml::Value::Table(t), Seg::Key(k), TomlEdit::Rename { to, .. }) => {
            if let Some(x) = t.remove(k) {
                t.insert(to.clone(), x);
            }
            format!("rename `{}` to {to:?}", show(&path))
        }
        (toml::Value::Array(a), Seg::At(i), TomlEdit::Remove { .. }) => {
            if *i < a.len() {
                a.remove(*i);
            }
            format!("remove `{}`", show(&path))
        }
        _ => "nothing".into(),
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Bytes(Vec<ByteEdit>),
    Toml(Vec<TomlEdit>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        prop::collection::vec(byte_edit(), 1..4).prop_map(Mutation::Bytes),
        prop::collection::vec(toml_edit(), 1..4).prop_map(Mutation::Toml),
    ]
}

/// The mutated file and what was done, in words.
fn mutate(m: &Mutation) -> (Vec<u8>, String) {
    let mut done = Vec::new();
    let bytes = match m {
        Mutation::Bytes(edits) => {
            let mut b = BASE.as_bytes().to_vec();
            for e in edits {
                let n = b.len();
                done.push(apply_bytes(&mut b, n, e));
            }
            b
        }
        Mutation::Toml(edits) => {
            let mut v = toml::Value::Table(toml::from_str(BASE).unwrap());
            for e in edits {
                done.push(apply_toml(&mut v, e));
            }
            match toml::to_string(&v) {
                Ok(s) => s.into_bytes(),
                Err(e) => {
                    done.push(format!("(not serializable: {e}; the base file instead)"));
                    BASE.as_bytes().to_vec()
                }
            }
        }
    };
    (bytes, done.join("; "))
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn mutated_repair_config_never_panics(m in mutation()) {
        thread_local! {
            static TMP: tempfile::TempDir = tempfile::tempdir().unwrap();
        }
        let (bytes, done) = mutate(&m);
        record("mutated_repair_config_never_panics", &done);
        TMP.with(|tmp| -> Result<(), TestCaseError> {
            let path = tmp.path().join("repair.toml");
            std::fs::write(&path, &bytes).unwrap();
            let what = format!("after [{done}]");
            let cfg = no_panic(&format!("RepairConfig::from_toml {what}"), || {
                RepairConfig::from_toml(&path).ok()
            })?;
            let Some(cfg) = cfg else { return Ok(()) };
            let valid = no_panic(&format!("TrainConfig::validate {what}"), || {
                let _ = cfg.checkpoint_dir();
                cfg.train.validate().is_ok()
            })?;
            if valid {
                let t = &cfg.train;
                let total = t.steps.clamp(1, 1 << 20);
                for step in [0, 1, t.warmup_steps.min(total), total / 2, total] {
                    let lr = no_panic(&format!("TrainConfig::lr_at({step}, {total}) {what}"), || {
                        t.lr_at(step, total)
                    })?;
                    prop_assert!(
                        lr.is_finite() && lr >= 0.0,
                        "a validated config gives lr {lr} at step {step} of {total} {what}"
                    );
                }
            }
            Ok(())
        })?;
    }
}

/// The base configuration reads and validates: the mutations break a valid file.
#[test]
fn the_base_config_reads_and_validates() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("repair.toml");
    std::fs::write(&path, BASE).unwrap();
    let cfg = RepairConfig::from_toml(&path).unwrap();
    cfg.train.validate().unwrap();
    assert_eq!(cfg.train.steps, 390);
    assert_eq!(cfg.train.adapters.language.rank, 8);
}
