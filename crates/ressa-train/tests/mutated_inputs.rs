//! Property tests: `RepairConfig::from_toml` takes any bytes. A complete repair configuration
//! (every table and field) is mutated at random — bits flipped, bytes overwritten, garbage
//! inserted, ranges deleted, truncation; TOML values replaced by hostile ones (0, -1, huge
//! integers, NaN, ±inf, empty strings, wrong types), removed, keys renamed — and read; a
//! configuration that reads is validated, and one that validates gives a finite, non-negative
//! learning rate at every step. Nothing panics.
//!
//! The input being read is written to `$CARGO_TARGET_TMPDIR/mutated_inputs/<test>.last`
//! first, so an abort still names it.

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use ressa_train::repair::RepairConfig;

#[path = "../../../tests/support/mutation.rs"]
#[allow(dead_code)]
mod mutation;
use mutation::*;

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
