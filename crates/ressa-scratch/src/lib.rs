//! Temporary paths beside an output, written under a hidden name and renamed over the target at
//! the end. While a [`Scratch`] lives its path is registered, so a signal handler can remove
//! every one of them ([`remove_all`]); dropping it unpersisted removes it (a failed run); and a
//! run that was killed outright (SIGKILL) leaves names that carry its PID, which the next run
//! sweeps ([`sweep_stale`]) once that process is gone.
//!
//! Names: `.{target file name}.{tag}.tmp-{pid}-{n}`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A registered temporary file or directory, removed on drop unless [`Scratch::persist`]ed.
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
    done: bool,
}

/// The hidden temporary name beside `target` for this process.
pub fn temp_name(target: &Path, tag: &str) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    target.with_file_name(format!(
        ".{name}.{tag}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

impl Scratch {
    /// Registers a temporary path beside `target` (nothing is created).
    pub fn beside(target: &Path, tag: &str) -> Self {
        Self::register(temp_name(target, tag))
    }

    /// Registers `path` itself.
    pub fn register(path: PathBuf) -> Self {
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(path.clone());
        Self { path, done: false }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path was renamed to its target (or is to be kept): nothing to remove.
    pub fn persist(mut self) {
        self.done = true;
        unregister(&self.path);
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.done {
            remove(&self.path);
            unregister(&self.path);
        }
    }
}

fn unregister(path: &Path) {
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(i) = live.iter().position(|p| p == path) {
        live.swap_remove(i);
    }
}

fn remove(path: &Path) {
    if path.is_dir() {
        let _ = std::fs::remove_dir_all(path);
    } else {
        let _ = std::fs::remove_file(path);
    }
}

/// Removes every registered path (a signal handler's work before it exits).
pub fn remove_all() {
    let live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    for p in live.iter() {
        remove(p);
    }
}

/// The PID in a temporary name of [`temp_name`]'s form, if `name` is one.
fn pid_of(name: &str) -> Option<u32> {
    if !name.starts_with('.') {
        return None;
    }
    let (_, rest) = name.rsplit_once(".tmp-")?;
    let pid = rest.split('-').next()?;
    pid.parse().ok()
}

/// Whether process `pid` is alive (Linux `/proc`; elsewhere every process counts as alive, so
/// nothing is swept).
fn alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let proc = Path::new("/proc");
    !proc.is_dir() || proc.join(pid.to_string()).exists()
}

/// Removes temporaries in `dir` left by processes that no longer run; returns how many.
pub fn sweep_stale(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = pid_of(&name)
            && !alive(pid)
        {
            remove(&e.path());
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_scratch_is_removed_and_persisted_is_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("out.json");
        let s = Scratch::beside(&target, "pred");
        std::fs::write(s.path(), b"x").unwrap();
        let p = s.path().to_path_buf();
        assert!(
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".out.json.pred.tmp-")
        );
        drop(s);
        assert!(!p.exists());
        let s = Scratch::beside(&target, "pred");
        std::fs::create_dir(s.path()).unwrap();
        std::fs::write(s.path().join("f"), b"x").unwrap();
        std::fs::rename(s.path(), &target).unwrap();
        s.persist();
        assert!(target.join("f").exists());
        // (In the same test: remove_all clears every live path of the process.)
        let s = Scratch::beside(&tmp.path().join("m"), "model");
        std::fs::create_dir(s.path()).unwrap();
        remove_all();
        assert!(!s.path().exists());
        s.persist();
    }

    #[test]
    fn stale_names_of_dead_processes_are_swept() {
        let tmp = tempfile::tempdir().unwrap();
        // PID 4194304 is above Linux's pid_max: never alive.
        let dead = tmp.path().join(".out.model.tmp-4194304-0");
        std::fs::create_dir(&dead).unwrap();
        let own = temp_name(&tmp.path().join("out"), "model");
        std::fs::create_dir(&own).unwrap();
        std::fs::write(tmp.path().join("keep.tmp-1"), b"").unwrap();
        assert_eq!(
            sweep_stale(tmp.path()),
            usize::from(Path::new("/proc").is_dir())
        );
        assert!(own.exists());
        assert!(tmp.path().join("keep.tmp-1").exists());
        assert_eq!(pid_of(".a.b.tmp-12-3"), Some(12));
        assert_eq!(pid_of("a.tmp-12"), None);
    }
}
