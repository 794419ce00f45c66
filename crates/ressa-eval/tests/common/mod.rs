//! Shared helpers for the parity tests: fixture loading and tolerances.
#![allow(dead_code)]

use std::path::PathBuf;

use serde_json::Value;

/// Absolute tolerance for every score compared with the Python tools.
pub const TOL: f64 = 1e-6;

/// `tests/fixtures/metrics/<name>` in the repository root.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/metrics")
        .join(name)
}

/// Parse a fixture file.
pub fn load(name: &str) -> Value {
    let path = fixture(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run scripts/make_metric_fixtures.py)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

pub fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

pub fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| s(x).to_string())
        .collect()
}

/// Assert `|a - b| <= TOL`, with context.
pub fn close(a: f64, b: f64, what: &str) {
    assert!(
        (a - b).abs() <= TOL || (a.is_nan() && b.is_nan()),
        "{what}: rust {a} vs python {b} (diff {})",
        (a - b).abs()
    );
}
