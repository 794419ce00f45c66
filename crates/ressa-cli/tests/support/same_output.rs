//! Comparing two pruned output directories (streamed and in-memory).

use std::path::{Path, PathBuf};

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Every file of `a` equals `b`'s byte for byte; `sparsity.json` up to its run time.
pub fn assert_same_output(a: &Path, b: &Path, case: &str) {
    let rel = |d: &Path| -> Vec<PathBuf> {
        files(d)
            .into_iter()
            .map(|p| p.strip_prefix(d).unwrap().to_path_buf())
            .collect()
    };
    assert_eq!(rel(a), rel(b), "{case}: different files");
    for f in rel(a) {
        let (x, y) = (
            std::fs::read(a.join(&f)).unwrap(),
            std::fs::read(b.join(&f)).unwrap(),
        );
        if f == Path::new("sparsity.json") {
            let strip = |bytes: &[u8]| {
                let mut v: serde_json::Value = serde_json::from_slice(bytes).unwrap();
                v.as_object_mut().unwrap().remove("time_s");
                v
            };
            assert_eq!(strip(&x), strip(&y), "{case}: sparsity.json");
        } else {
            assert!(x == y, "{case}: {} differs", f.display());
        }
    }
}
