//! Where commands write: never over or into an input, never half a file.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ressa_scratch::Scratch;

/// The absolute, symlink-resolved form of `p` (its parent resolved when `p` does not exist).
fn resolve(p: &Path) -> PathBuf {
    if let Ok(c) = p.canonicalize() {
        return c;
    }
    let parent = p
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match (parent.canonicalize(), p.file_name()) {
        (Ok(d), Some(name)) => d.join(name),
        _ => std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf()),
    }
}

/// Refuses an output `out` (flag `flag`) that is one of `inputs`, lies inside an input
/// directory, or holds an input.
pub fn refuse_alias(flag: &str, out: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    check(flag, out, inputs, true)
}

/// [`refuse_alias`] for inputs beside which outputs may live (an image root, a data list's
/// directory): `out` is neither one of them nor holds one.
pub fn refuse_overwrite(flag: &str, out: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    check(flag, out, inputs, false)
}

/// Whether `a` and `b` are the same file (device and inode: hard links included).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

fn check(flag: &str, out: &Path, inputs: &[(&str, &Path)], not_inside: bool) -> Result<()> {
    let o = resolve(out);
    for (what, input) in inputs {
        let i = resolve(input);
        if o == i || same_file(out, input) {
            bail!(
                "{flag} {}: is the {what}; inputs are never overwritten",
                out.display()
            );
        }
        if not_inside && i.is_dir() && o.starts_with(&i) {
            bail!(
                "{flag} {}: lies inside the {what} {}; write outputs elsewhere",
                out.display(),
                input.display()
            );
        }
        if o.is_dir() && i.starts_with(&o) {
            bail!(
                "{flag} {}: holds the {what} {}; write outputs elsewhere",
                out.display(),
                input.display()
            );
        }
    }
    Ok(())
}

/// Writes `bytes` to a hidden temporary sibling of `path` and renames it over `path` (the
/// temporary is removed on error or interrupt; stale ones of killed runs are swept first).
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        ressa_scratch::sweep_stale(parent);
    }
    let scratch = Scratch::beside(path, "partial");
    let result = (|| -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(scratch.path())?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(scratch.path(), path)
    })();
    result.with_context(|| path.display().to_string())?;
    scratch.persist();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_are_refused_and_siblings_allowed() {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("model");
        std::fs::create_dir(&model).unwrap();
        let inputs = tmp.path().join("in.safetensors");
        std::fs::write(&inputs, b"x").unwrap();
        let given = [("model", model.as_path()), ("inputs", inputs.as_path())];
        assert!(refuse_alias("--out", &inputs, &given).is_err());
        assert!(refuse_alias("--out", &model.join("model.safetensors"), &given).is_err());
        assert!(refuse_alias("--out", tmp.path(), &given).is_err());
        // The same file through `..` is still the input.
        let dotted = model.join("..").join("in.safetensors");
        assert!(refuse_alias("--out", &dotted, &given).is_err());
        // A hard link to the input is the input.
        let link = tmp.path().join("link.safetensors");
        std::fs::hard_link(&inputs, &link).unwrap();
        assert!(refuse_alias("--out", &link, &given).is_err());
        std::fs::remove_file(&link).unwrap();
        assert!(refuse_alias("--out", &tmp.path().join("logits.safetensors"), &given).is_ok());
        let images = [("image directory", tmp.path())];
        assert!(refuse_overwrite("--out", &tmp.path().join("out"), &images).is_ok());
        assert!(refuse_overwrite("--out", tmp.path(), &images).is_err());
        write_file_atomically(&tmp.path().join("o.bin"), b"ok").unwrap();
        assert_eq!(std::fs::read(tmp.path().join("o.bin")).unwrap(), b"ok");
        let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
        assert_eq!(names.len(), 3, "no temporary file left");
    }
}
