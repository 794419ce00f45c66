//! Hostile input for every `ressa` command, against the product's contract for bad input:
//!
//! - a non-zero exit code, no panic, not killed by a signal;
//! - exactly one line on stderr starting with `error:`, naming the file and the key or field
//!   (or the flag) and what was expected (each case gives the substrings it must contain: a
//!   value flag by its name, a path given to a flag by the flag or the path);
//! - nothing left behind: the `--out` path does not exist afterwards (unless it did before),
//!   no temporary files (`.NAME.tmp-*`, `.ressa-masks.*.spill`) or other new files appear in
//!   the case's directory (which holds the output's parent) or the working directory;
//! - every input (files and directories named on the command line, and the case's whole
//!   directory) is byte-identical afterwards.
//!
//! Each case copies a committed fixture into its own directory and breaks one thing. The
//! control runs first check that the unbroken commands succeed, so a case fails for its own
//! breakage only. All cases run in one test and every failure is collected into one report
//! (the full table is printed on stderr: `cargo test -p ressa-cli --test hostile -- --nocapture`).
//!
//! Every run is confined so that an unvalidated absurd size fails fast instead of taking the
//! machine: `ulimit -v` of 8 GiB, `RUST_MIN_STACK` of 64 MiB (a thread pool of 100000 workers
//! runs out of address space after ~100 threads instead of exhausting the PIDs), and a
//! 120-second timeout per run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(120);
const PROMPT: &str = "question: what is the color of the circle short answer:";

fn repo(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(p)
}

fn fixture(name: &str) -> PathBuf {
    repo("tests/fixtures/models").join(name)
}

fn cal() -> PathBuf {
    repo("tests/fixtures/calibration")
}

fn data(rel: &str) -> PathBuf {
    repo("tests/fixtures/data").join(rel)
}

fn metrics(rel: &str) -> PathBuf {
    repo("tests/fixtures/metrics").join(rel)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let to = dst.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &to);
        } else {
            std::fs::copy(&p, &to).unwrap();
        }
    }
}

/// Deterministic garbage.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn write_json(p: &Path, v: &Value) {
    std::fs::write(p, serde_json::to_vec_pretty(v).unwrap()).unwrap();
}

fn edit_json(p: &Path, f: impl FnOnce(&mut Value)) {
    let mut v = read_json(p);
    f(&mut v);
    write_json(p, &v);
}

/// Removes `key` from the object at JSON pointer `at`.
fn remove_key(v: &mut Value, at: &str, key: &str) {
    v.pointer_mut(at)
        .and_then(Value::as_object_mut)
        .unwrap()
        .remove(key)
        .unwrap();
}

/// Sets the value at JSON pointer `at` (which must exist).
fn set_json(v: &mut Value, at: &str, value: Value) {
    *v.pointer_mut(at)
        .unwrap_or_else(|| panic!("no {at} in the fixture")) = value;
}

struct Tensor {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn read_st(p: &Path) -> Vec<Tensor> {
    let bytes = std::fs::read(p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<Tensor> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| Tensor {
            name,
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
            bytes: t.data().to_vec(),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn write_st(p: &Path, tensors: &[Tensor]) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, p).unwrap();
}

fn edit_st(p: &Path, f: impl FnOnce(&mut Vec<Tensor>)) {
    let mut t = read_st(p);
    f(&mut t);
    write_st(p, &t);
}

fn tensor<'a>(ts: &'a mut [Tensor], name: &str) -> &'a mut Tensor {
    ts.iter_mut()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no tensor {name}"))
}

/// The length of a safetensors file's JSON header.
fn header_len(bytes: &[u8]) -> usize {
    u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

/// Command-line arguments with flags that can be replaced.
#[derive(Clone)]
struct Argv(Vec<String>);

impl Argv {
    fn new(parts: &[&str]) -> Self {
        Self(parts.iter().map(|p| p.to_string()).collect())
    }

    /// Sets `--flag value`, replacing an earlier value (a value starting with `-` is given
    /// as `--flag=value`).
    fn set(mut self, flag: &str, value: &str) -> Self {
        self = self.unset(flag);
        if value.starts_with('-') {
            self.0.push(format!("{flag}={value}"));
        } else {
            self.0.push(flag.to_string());
            self.0.push(value.to_string());
        }
        self
    }

    /// Removes `--flag` and its value.
    fn unset(mut self, flag: &str) -> Self {
        if let Some(i) = self.0.iter().position(|a| a == flag) {
            self.0.drain(i..(i + 2).min(self.0.len()));
        }
        let eq = format!("{flag}=");
        self.0.retain(|a| !a.starts_with(&eq));
        self
    }

    fn add(mut self, parts: &[&str]) -> Self {
        self.0.extend(parts.iter().map(|p| p.to_string()));
        self
    }

    fn value(&self, flag: &str) -> Option<&str> {
        let i = self.0.iter().position(|a| a == flag)?;
        self.0.get(i + 1).map(String::as_str)
    }
}

struct Case {
    name: String,
    dir: PathBuf,
    args: Vec<String>,
    /// Groups of substrings: the error line contains at least one of each group.
    needles: Vec<Vec<String>>,
    /// Inputs besides the paths on the command line and the case's directory.
    inputs: Vec<PathBuf>,
    out: Option<PathBuf>,
}

impl Case {
    fn needle(&mut self, n: &str) -> &mut Self {
        self.needles.push(vec![n.to_string()]);
        self
    }

    fn any(&mut self, ns: &[&str]) -> &mut Self {
        self.needles
            .push(ns.iter().map(|n| n.to_string()).collect());
        self
    }

    fn input(&mut self, p: &Path) -> &mut Self {
        self.inputs.push(p.to_path_buf());
        self
    }

    fn out(&mut self, p: &Path) -> &mut Self {
        self.out = Some(p.to_path_buf());
        self
    }
}

/// Files and directories under `p` (directories as `None`), by path.
type Snapshot = BTreeMap<PathBuf, Option<Vec<u8>>>;

fn snapshot(p: &Path, into: &mut Snapshot) {
    let Ok(meta) = std::fs::symlink_metadata(p) else {
        return;
    };
    if meta.is_dir() {
        into.insert(p.to_path_buf(), None);
        let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for e in entries {
            snapshot(&e, into);
        }
    } else {
        into.insert(p.to_path_buf(), Some(std::fs::read(p).unwrap_or_default()));
    }
}

fn is_temporary(p: &Path) -> bool {
    let name = p.file_name().unwrap_or_default().to_string_lossy();
    name.contains(".tmp-") || name.starts_with(".ressa-masks.") || name.ends_with(".spill")
}

struct Run {
    status: Option<ExitStatus>,
    timed_out: bool,
    stderr: String,
    seconds: f64,
}

/// Runs the binary on `args` in `cwd`, confined (see the module docs).
fn run_ressa(args: &[String], cwd: &Path, logs: &Path, name: &str, hf_cache: &Path) -> Run {
    let out_log = logs.join(format!("{name}.stdout"));
    let err_log = logs.join(format!("{name}.stderr"));
    let start = Instant::now();
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(r#"ulimit -v 8388608 2>/dev/null; exec "$0" "$@""#)
        .arg(env!("CARGO_BIN_EXE_ressa"))
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "warn")
        .env("RUST_MIN_STACK", "67108864")
        .env("HF_HUB_CACHE", hf_cache)
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_log).unwrap())
        .stderr(std::fs::File::create(&err_log).unwrap())
        .spawn()
        .expect("run ressa");
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if start.elapsed() > TIMEOUT {
            timed_out = true;
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Run {
        status,
        timed_out,
        stderr: String::from_utf8_lossy(&std::fs::read(&err_log).unwrap_or_default()).into_owned(),
        seconds: start.elapsed().as_secs_f64(),
    }
}

fn one_line(s: &str, max: usize) -> String {
    let s = s.replace('\n', " ⏎ ");
    if s.chars().count() > max {
        format!("{}…", s.chars().take(max).collect::<String>())
    } else {
        s
    }
}

/// What a run looked like, for the report: exit status and the first error line.
fn describe(run: &Run) -> String {
    let status = match (&run.status, run.timed_out) {
        (_, true) => "timed out".to_string(),
        (Some(st), _) => match st.code() {
            Some(c) => format!("exit {c}"),
            None => format!("signal ({st})"),
        },
        (None, _) => "?".into(),
    };
    let first = run
        .stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .or_else(|| run.stderr.lines().find(|l| l.contains("panicked")))
        .or_else(|| run.stderr.lines().rfind(|l| !l.trim().is_empty()))
        .unwrap_or("(empty stderr)");
    format!("{status}, {}", one_line(first, 240))
}

struct Suite {
    root: tempfile::TempDir,
    cases: Vec<Case>,
    /// Case directories are numbered, so that no word of a case's name is in its paths (and
    /// matches a needle by accident).
    dirs: std::cell::Cell<usize>,
}

impl Suite {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        for d in ["cases", "logs", "hf-cache", "shared"] {
            std::fs::create_dir(root.path().join(d)).unwrap();
        }
        Self {
            root,
            cases: Vec::new(),
            dirs: std::cell::Cell::new(0),
        }
    }

    fn logs(&self) -> PathBuf {
        self.root.path().join("logs")
    }

    fn hf_cache(&self) -> PathBuf {
        self.root.path().join("hf-cache")
    }

    /// A fresh directory for case `name`.
    fn dir(&self, name: &str) -> PathBuf {
        let n = self.dirs.get();
        self.dirs.set(n + 1);
        let d = self.root.path().join("cases").join(format!("c{n:03}"));
        std::fs::create_dir(&d).unwrap_or_else(|e| panic!("case {name}: {e}"));
        std::fs::create_dir(d.join("cwd")).unwrap();
        d
    }

    /// A copy of the fixture model `name` in `dir`.
    fn model(&self, dir: &Path, name: &str) -> PathBuf {
        let m = dir.join(name);
        copy_dir(&fixture(name), &m);
        m
    }

    fn case(&mut self, name: &str, dir: &Path, args: Argv) -> &mut Case {
        assert!(
            self.cases.iter().all(|c| c.name != name),
            "duplicate case name {name}"
        );
        self.cases.push(Case {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            args: args.0,
            needles: Vec::new(),
            inputs: Vec::new(),
            out: None,
        });
        self.cases.last_mut().unwrap()
    }

    /// Runs an unbroken command; it must succeed.
    /// Runs an unbroken command: whether it succeeded, and its one-line summary.
    fn control(&self, name: &str, args: &Argv) -> (bool, String) {
        let cwd = self.root.path().join("shared").join(format!("cwd-{name}"));
        std::fs::create_dir_all(&cwd).unwrap();
        let run = run_ressa(&args.0, &cwd, &self.logs(), name, &self.hf_cache());
        let ok = run.status.is_some_and(|s| s.success());
        let line = format!("{:.2}s {}", run.seconds, describe(&run));
        (ok, line)
    }
}

/// Runs one case and checks the contract; `Err` lists every violation.
fn check(suite: &Suite, case: &Case) -> (Result<(), Vec<String>>, String, f64) {
    let out = case
        .out
        .clone()
        .or_else(|| Argv(case.args.clone()).value("--out").map(PathBuf::from));
    // Inputs: the case directory, every existing path on the command line, the extras.
    let mut before = Snapshot::new();
    snapshot(&case.dir, &mut before);
    let mut external: Vec<PathBuf> = case
        .args
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.is_absolute() && p.exists() && !p.starts_with(&case.dir))
        .chain(case.inputs.iter().cloned())
        .collect();
    external.sort();
    external.dedup();
    for p in &external {
        snapshot(p, &mut before);
    }
    let out_existed = out.as_ref().is_some_and(|o| o.exists());

    let run = run_ressa(
        &case.args,
        &case.dir.join("cwd"),
        &suite.logs(),
        &case.name,
        &suite.hf_cache(),
    );
    let summary = describe(&run);
    let mut v = Vec::new();

    match (&run.status, run.timed_out) {
        (_, true) => v.push(format!("timed out after {}s", TIMEOUT.as_secs())),
        (Some(st), _) if st.success() => v.push("exit status 0 (success)".into()),
        (Some(st), _) if st.code().is_none() => v.push(format!("killed by a signal: {st}")),
        _ => {}
    }
    if run.stderr.contains("panicked") {
        let at = run
            .stderr
            .lines()
            .find(|l| l.contains("panicked"))
            .unwrap_or("");
        v.push(format!("panicked: {}", one_line(at, 300)));
    }
    let errors: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect();
    if errors.len() != 1 {
        v.push(format!(
            "{} lines start with `error:` (expected 1); stderr: {}",
            errors.len(),
            one_line(&run.stderr, 400)
        ));
    }
    if let Some(line) = errors.first() {
        // Needles are matched with the temporary root and the repository spelled out of the
        // way, so that no random letters of a path match.
        let tmp = s(suite.root.path());
        let repo_root = repo("");
        let plain = |x: &str| x.replace(tmp, "$TMP").replace(s(&repo_root), "$REPO/");
        let line = plain(line);
        for group in &case.needles {
            if !group.iter().any(|n| line.contains(&plain(n))) {
                if group.len() == 1 {
                    v.push(format!("error line lacks `{}`", group[0]));
                } else {
                    v.push(format!("error line lacks any of {group:?}"));
                }
            }
        }
    }

    // Nothing written, nothing changed.
    let mut after = Snapshot::new();
    snapshot(&case.dir, &mut after);
    for p in &external {
        snapshot(p, &mut after);
    }
    if let Some(o) = &out
        && !out_existed
        && o.exists()
    {
        v.push(format!("--out {} exists afterwards", o.display()));
    }
    let rel = |p: &Path| {
        p.strip_prefix(&case.dir)
            .map(|r| r.display().to_string())
            .unwrap_or_else(|_| p.display().to_string())
    };
    for (p, content) in &after {
        match before.get(p) {
            None if is_temporary(p) => v.push(format!("temporary file left: {}", rel(p))),
            None if out.as_ref().is_some_and(|o| p.starts_with(o)) => {}
            None => v.push(format!("new file left: {}", rel(p))),
            Some(b) if b != content => v.push(format!("input modified: {}", rel(p))),
            Some(_) => {}
        }
    }
    for p in before.keys() {
        if !after.contains_key(p) {
            v.push(format!("input removed: {}", rel(p)));
        }
    }
    let result = if v.is_empty() { Ok(()) } else { Err(v) };
    (result, summary, run.seconds)
}

// ---------------------------------------------------------------------------------------------
// The cases.

/// A case that sets flags: (name, `(flag, value)`s, needle).
type FlagCase = (
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static str,
);
/// (name, `(flag, value)`s set, flags removed from the base, needle).
type PruneFlagCase = (
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static [&'static str],
    &'static str,
);
/// (name, `(flag, value)`s, needles of which one must be in the error).
type RepairFlagCase = (
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static [&'static str],
);
type JsonEditFn = Box<dyn Fn(&mut Value)>;
type TensorEditFn = Box<dyn Fn(&mut Vec<Tensor>)>;

fn generate_args(model: &Path, image: &Path) -> Argv {
    Argv::new(&[
        "generate",
        "--model",
        s(model),
        "--image",
        s(image),
        "--prompt",
        PROMPT,
        "--beams",
        "1",
        "--max-new-tokens",
        "3",
    ])
}

fn image0() -> PathBuf {
    fixture("instructblip-t5-a").join("image0.png")
}

fn generate_cases(t: &mut Suite) {
    let a = "instructblip-t5-a";
    let flag_cases: &[FlagCase] = &[
        ("generate_empty_prompt", &[("--prompt", "")], "--prompt"),
        (
            "generate_empty_qformer_prompt",
            &[("--qformer-prompt", "")],
            "--qformer-prompt",
        ),
        ("generate_beams_0", &[("--beams", "0")], "--beams"),
        (
            "generate_max_new_tokens_0",
            &[("--max-new-tokens", "0")],
            "--max-new-tokens",
        ),
        (
            "generate_min_above_max",
            &[("--min-new-tokens", "5"), ("--max-new-tokens", "2")],
            "--min-new-tokens",
        ),
        (
            "generate_repetition_penalty_0",
            &[("--repetition-penalty", "0")],
            "--repetition-penalty",
        ),
        (
            "generate_repetition_penalty_nan",
            &[("--repetition-penalty", "NaN")],
            "--repetition-penalty",
        ),
        (
            "generate_repetition_penalty_negative",
            &[("--repetition-penalty", "-1")],
            "--repetition-penalty",
        ),
        (
            "generate_length_penalty_nan",
            &[("--length-penalty", "NaN")],
            "--length-penalty",
        ),
    ];
    for (name, flags, needle) in flag_cases {
        let d = t.dir(name);
        let m = t.model(&d, a);
        let mut args = generate_args(&m, &image0());
        for (f, v) in *flags {
            args = args.set(f, v);
        }
        t.case(name, &d, args).needle(needle);
    }

    // Images that are not images.
    let d = t.dir("generate_truncated_png");
    let m = t.model(&d, a);
    let img = d.join("trunc.png");
    std::fs::write(&img, &std::fs::read(image0()).unwrap()[..300]).unwrap();
    t.case("generate_truncated_png", &d, generate_args(&m, &img))
        .needle("trunc.png");

    let d = t.dir("generate_garbage_jpeg");
    let m = t.model(&d, a);
    let img = d.join("noise.jpg");
    std::fs::write(&img, noise(4096, 1)).unwrap();
    t.case("generate_garbage_jpeg", &d, generate_args(&m, &img))
        .needle("noise.jpg");

    let d = t.dir("generate_empty_image_file");
    let m = t.model(&d, a);
    let img = d.join("empty.png");
    std::fs::write(&img, b"").unwrap();
    t.case("generate_empty_image_file", &d, generate_args(&m, &img))
        .needle("empty.png");

    let d = t.dir("generate_missing_image");
    let m = t.model(&d, a);
    t.case(
        "generate_missing_image",
        &d,
        generate_args(&m, &d.join("absent.png")),
    )
    .needle("absent.png");

    let d = t.dir("generate_image_is_a_directory");
    let m = t.model(&d, a);
    let img = d.join("imgdir.png");
    std::fs::create_dir(&img).unwrap();
    t.case("generate_image_is_a_directory", &d, generate_args(&m, &img))
        .needle("imgdir.png");
}

/// Model-file breakages (weights, config, tokenizers, preprocessor), run through various
/// commands that load the model.
fn model_file_cases(t: &mut Suite) {
    let a = "instructblip-t5-a";
    let gen_ = |m: &Path| generate_args(m, &image0());
    let inspect = |m: &Path| Argv::new(&["inspect", "--model", s(m)]);

    // --- model.safetensors
    let d = t.dir("weights_truncated");
    let m = t.model(&d, a);
    let w = m.join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    t.case("weights_truncated", &d, gen_(&m))
        .needle("model.safetensors");

    let d = t.dir("weights_garbage");
    let m = t.model(&d, a);
    std::fs::write(m.join("model.safetensors"), noise(4096, 2)).unwrap();
    t.case("weights_garbage", &d, inspect(&m))
        .needle("model.safetensors");

    let d = t.dir("weights_empty_file");
    let m = t.model(&d, a);
    std::fs::write(m.join("model.safetensors"), b"").unwrap();
    t.case("weights_empty_file", &d, gen_(&m))
        .needle("model.safetensors");

    let d = t.dir("weights_header_claims_huge_size");
    let m = t.model(&d, a);
    let w = m.join("model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&w, bytes).unwrap();
    t.case("weights_header_claims_huge_size", &d, gen_(&m))
        .needle("model.safetensors");

    let d = t.dir("weights_header_not_json");
    let m = t.model(&d, a);
    let w = m.join("model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let n = header_len(&bytes);
    bytes[8..8 + n].fill(b'#');
    std::fs::write(&w, bytes).unwrap();
    t.case("weights_header_not_json", &d, inspect(&m))
        .needle("model.safetensors");

    let d = t.dir("weights_offsets_reversed");
    let m = t.model(&d, a);
    let w = m.join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    let n = header_len(&bytes);
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let key = "vision_model.post_layernorm.weight";
    let [a0, a1] = [
        header[key]["data_offsets"][0].as_u64().unwrap(),
        header[key]["data_offsets"][1].as_u64().unwrap(),
    ];
    header[key]["data_offsets"] = json!([a1, a0]);
    let mut h = serde_json::to_vec(&header).unwrap();
    while h.len() < n {
        h.push(b' ');
    }
    let mut new = (h.len() as u64).to_le_bytes().to_vec();
    new.extend_from_slice(&h);
    new.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&w, new).unwrap();
    t.case("weights_offsets_reversed", &d, inspect(&m))
        .needle("model.safetensors");

    let d = t.dir("weights_tensor_wrong_shape");
    let m = t.model(&d, a);
    edit_st(&m.join("model.safetensors"), |ts| {
        tensor(ts, "language_model.shared.weight").shape = vec![2400];
    });
    t.case("weights_tensor_wrong_shape", &d, gen_(&m))
        .needle("model.safetensors")
        .needle("language_model.shared.weight");

    let d = t.dir("weights_tensor_wrong_dtype");
    let m = t.model(&d, a);
    edit_st(&m.join("model.safetensors"), |ts| {
        tensor(ts, "vision_model.post_layernorm.weight").dtype = Dtype::I32;
    });
    t.case("weights_tensor_wrong_dtype", &d, inspect(&m))
        .needle("model.safetensors")
        .needle("vision_model.post_layernorm.weight");

    let d = t.dir("weights_tensor_missing");
    let m = t.model(&d, a);
    edit_st(&m.join("model.safetensors"), |ts| {
        ts.retain(|t| t.name != "qformer.embeddings.layernorm.weight")
    });
    t.case("weights_tensor_missing", &d, gen_(&m))
        .needle("model.safetensors")
        .needle("qformer.embeddings.layernorm.weight");

    // --- config.json
    let config_cases: Vec<(&str, JsonEditFn, Vec<&str>)> = vec![
        (
            "config_num_query_tokens_is_a_string",
            Box::new(|v| set_json(v, "/num_query_tokens", json!("four"))),
            vec!["num_query_tokens"],
        ),
        (
            "config_num_query_tokens_negative",
            Box::new(|v| set_json(v, "/num_query_tokens", json!(-4))),
            vec!["num_query_tokens"],
        ),
        (
            "config_missing_vision_hidden_size",
            Box::new(|v| remove_key(v, "/vision_config", "hidden_size")),
            vec!["hidden_size"],
        ),
        (
            "config_unknown_model_type",
            Box::new(|v| set_json(v, "/model_type", json!("gpt2"))),
            vec!["model_type"],
        ),
        (
            "config_unknown_text_model_type",
            Box::new(|v| set_json(v, "/text_config/model_type", json!("bert"))),
            vec!["model_type"],
        ),
        (
            "config_vision_heads_zero",
            Box::new(|v| set_json(v, "/vision_config/num_attention_heads", json!(0))),
            vec!["num_attention_heads"],
        ),
        (
            "config_text_d_model_zero",
            Box::new(|v| set_json(v, "/text_config/d_model", json!(0))),
            vec!["d_model"],
        ),
        (
            "config_text_heads_zero",
            Box::new(|v| set_json(v, "/text_config/num_heads", json!(0))),
            vec!["num_heads"],
        ),
        (
            "config_patch_size_zero",
            Box::new(|v| set_json(v, "/vision_config/patch_size", json!(0))),
            vec!["patch_size"],
        ),
        (
            "config_patch_size_does_not_divide_image",
            Box::new(|v| set_json(v, "/vision_config/patch_size", json!(7))),
            vec!["patch_size"],
        ),
        (
            "config_text_num_heads_is_a_string",
            Box::new(|v| set_json(v, "/text_config/num_heads", json!("4"))),
            vec!["num_heads"],
        ),
    ];
    for (i, (name, edit, needles)) in config_cases.into_iter().enumerate() {
        let d = t.dir(name);
        let m = t.model(&d, a);
        edit_json(&m.join("config.json"), edit);
        let args = if i % 2 == 0 { gen_(&m) } else { inspect(&m) };
        let c = t.case(name, &d, args).needle("config.json");
        for n in needles {
            c.needles.push(vec![n.to_string()]);
        }
    }

    // Absurd sizes: the error names the config field, or the tensor whose shape it contradicts.
    let d = t.dir("config_absurd_vocab_size");
    let m = t.model(&d, a);
    edit_json(&m.join("config.json"), |v| {
        set_json(
            v,
            "/text_config/vocab_size",
            json!(1_000_000_000_000_000u64),
        )
    });
    t.case("config_absurd_vocab_size", &d, gen_(&m))
        .any(&["config.json", "model.safetensors"])
        .any(&["vocab_size", "language_model.shared.weight"]);

    let d = t.dir("config_absurd_layer_count");
    let m = t.model(&d, a);
    edit_json(&m.join("config.json"), |v| {
        set_json(
            v,
            "/vision_config/num_hidden_layers",
            json!(1_000_000_000_000u64),
        )
    });
    t.case("config_absurd_layer_count", &d, inspect(&m))
        .any(&["config.json", "model.safetensors"])
        .any(&["num_hidden_layers", "vision_model.encoder.layers.2"]);

    let d = t.dir("config_not_json");
    let m = t.model(&d, a);
    std::fs::write(m.join("config.json"), "{ \"model_type\": instructblip ").unwrap();
    t.case("config_not_json", &d, gen_(&m))
        .needle("config.json");

    let d = t.dir("config_is_an_array");
    let m = t.model(&d, a);
    std::fs::write(m.join("config.json"), "[]").unwrap();
    t.case("config_is_an_array", &d, inspect(&m))
        .needle("config.json");

    // --- tokenizers
    let d = t.dir("tokenizer_garbage");
    let m = t.model(&d, a);
    std::fs::write(m.join("tokenizer.json"), noise(2000, 3)).unwrap();
    t.case("tokenizer_garbage", &d, gen_(&m))
        .needle("tokenizer.json");

    let d = t.dir("tokenizer_empty_object");
    let m = t.model(&d, a);
    std::fs::write(m.join("tokenizer.json"), "{}").unwrap();
    t.case("tokenizer_empty_object", &d, gen_(&m))
        .needle("tokenizer.json");

    let d = t.dir("tokenizer_ids_exceed_vocab");
    let m = t.model(&d, a);
    edit_json(&m.join("tokenizer.json"), |v| {
        v["model"]["vocab"]["zebra"] = json!(100)
    });
    t.case("tokenizer_ids_exceed_vocab", &d, gen_(&m))
        .needle("tokenizer.json")
        .needle("vocab_size");

    let d = t.dir("qformer_tokenizer_ids_exceed_vocab");
    let m = t.model(&d, a);
    edit_json(&m.join("qformer_tokenizer/tokenizer.json"), |v| {
        v["model"]["vocab"]["zebra"] = json!(77)
    });
    t.case("qformer_tokenizer_ids_exceed_vocab", &d, gen_(&m))
        .needle("qformer_tokenizer")
        .needle("vocab_size");

    let d = t.dir("qformer_tokenizer_missing");
    let m = t.model(&d, a);
    std::fs::remove_dir_all(m.join("qformer_tokenizer")).unwrap();
    t.case("qformer_tokenizer_missing", &d, gen_(&m))
        .needle("qformer_tokenizer");

    // --- preprocessor_config.json
    let d = t.dir("preprocessor_not_json");
    let m = t.model(&d, a);
    std::fs::write(m.join("preprocessor_config.json"), "size: 32").unwrap();
    t.case("preprocessor_not_json", &d, gen_(&m))
        .needle("preprocessor_config.json");

    let d = t.dir("preprocessor_missing");
    let m = t.model(&d, a);
    std::fs::remove_file(m.join("preprocessor_config.json")).unwrap();
    t.case("preprocessor_missing", &d, gen_(&m))
        .needle("preprocessor_config.json");

    for (name, key, value) in [
        (
            "preprocessor_image_mean_one_value",
            "image_mean",
            json!([0.5]),
        ),
        (
            "preprocessor_image_std_zero",
            "image_std",
            json!([0.0, 0.0, 0.0]),
        ),
        (
            "preprocessor_rescale_factor_string",
            "rescale_factor",
            json!("1/255"),
        ),
    ] {
        let d = t.dir(name);
        let m = t.model(&d, a);
        edit_json(&m.join("preprocessor_config.json"), |v| v[key] = value);
        t.case(name, &d, gen_(&m))
            .needle("preprocessor_config.json")
            .needle(key);
    }

    // --- sharded checkpoints (instructblip-t5-b)
    let b = "instructblip-t5-b";
    let shard1 = "model-00001-of-00002.safetensors";
    let index = "model.safetensors.index.json";
    let remap = |m: &Path, to: &str| {
        edit_json(&m.join(index), |v| {
            for (_, f) in v["weight_map"].as_object_mut().unwrap() {
                if f == shard1 {
                    *f = json!(to);
                }
            }
        })
    };
    let d = t.dir("shard_path_escapes_dir");
    let m = t.model(&d, b);
    std::fs::copy(m.join(shard1), d.join("x.safetensors")).unwrap();
    remap(&m, "../x.safetensors");
    t.case(
        "shard_path_escapes_dir",
        &d,
        Argv::new(&["inspect", "--model", s(&m)]),
    )
    .needle(index)
    .needle("../x.safetensors");

    let d = t.dir("shard_path_absolute");
    let m = t.model(&d, b);
    let abs = d.join("abs.safetensors");
    std::fs::copy(m.join(shard1), &abs).unwrap();
    remap(&m, s(&abs));
    t.case(
        "shard_path_absolute",
        &d,
        generate_args(&m, &m.join("image0.png")),
    )
    .needle(index)
    .needle(s(&abs));

    let d = t.dir("shard_missing");
    let m = t.model(&d, b);
    edit_json(&m.join(index), |v| {
        let (_, f) = v["weight_map"]
            .as_object_mut()
            .unwrap()
            .iter_mut()
            .next()
            .unwrap();
        *f = json!("model-00003-of-00002.safetensors");
    });
    let out = d.join("out");
    t.case(
        "shard_missing",
        &d,
        Argv::new(&["export", s(&m), "--format", "dense", "--out", s(&out)]),
    )
    .needle("model-00003-of-00002.safetensors");

    let d = t.dir("shard_index_not_json");
    let m = t.model(&d, b);
    std::fs::write(m.join(index), "{\"weight_map\": {").unwrap();
    let out = d.join("out");
    t.case(
        "shard_index_not_json",
        &d,
        Argv::new(&[
            "prune",
            "--model",
            s(&m),
            "--method",
            "magnitude",
            "--sparsity",
            "0.5",
            "--out",
            s(&out),
        ]),
    )
    .needle(index);

    let d = t.dir("shard_index_names_wrong_shard");
    let m = t.model(&d, b);
    let key = "language_model.decoder.block.0.layer.0.SelfAttention.k.weight";
    edit_json(&m.join(index), |v| {
        v["weight_map"][key] = json!("model-00002-of-00002.safetensors")
    });
    t.case(
        "shard_index_names_wrong_shard",
        &d,
        Argv::new(&["inspect", "--model", s(&m)]),
    )
    .needle(key);

    let d = t.dir("shard_index_weight_map_wrong_type");
    let m = t.model(&d, b);
    edit_json(&m.join(index), |v| v["weight_map"] = json!([shard1]));
    t.case(
        "shard_index_weight_map_wrong_type",
        &d,
        Argv::new(&["inspect", "--model", s(&m)]),
    )
    .needle(index)
    .needle("weight_map");
}

fn logits_cases(t: &mut Suite) {
    let a = "instructblip-t5-a";
    // Each case: its own model copy and inputs file (a copy of the fixture's reference).
    let setup = |t: &Suite, name: &str| {
        let d = t.dir(name);
        let m = t.model(&d, a);
        let inputs = d.join("in.safetensors");
        std::fs::copy(m.join("reference.safetensors"), &inputs).unwrap();
        let out = d.join("logits.safetensors");
        let args = Argv::new(&[
            "logits",
            "--model",
            s(&m),
            "--inputs",
            s(&inputs),
            "--out",
            s(&out),
        ]);
        (d, m, inputs, args)
    };

    let (d, _, inputs, args) = setup(t, "logits_out_is_the_inputs_file");
    t.case(
        "logits_out_is_the_inputs_file",
        &d,
        args.set("--out", s(&inputs)),
    )
    .any(&["--out", s(&inputs)])
    .out(&inputs);

    let (d, m, _, args) = setup(t, "logits_out_is_model_safetensors");
    let w = m.join("model.safetensors");
    t.case(
        "logits_out_is_model_safetensors",
        &d,
        args.set("--out", s(&w)),
    )
    .any(&["--out", s(&w)])
    .out(&w);

    let (d, _, _, args) = setup(t, "logits_out_in_missing_directory");
    let o = d.join("missing-dir").join("o.safetensors");
    t.case(
        "logits_out_in_missing_directory",
        &d,
        args.set("--out", s(&o)),
    )
    .needle("missing-dir");

    let (d, _, inputs, args) = setup(t, "logits_inputs_truncated");
    let bytes = std::fs::read(&inputs).unwrap();
    std::fs::write(&inputs, &bytes[..bytes.len() - 100]).unwrap();
    t.case("logits_inputs_truncated", &d, args)
        .needle("in.safetensors");

    let edits: Vec<(&str, TensorEditFn, &str)> = vec![
        (
            // Batch 0 once segfaulted inside the vision matmul.
            "logits_batch_0",
            Box::new(|ts| {
                for t in ts.iter_mut() {
                    if t.shape.first() == Some(&2) {
                        t.shape[0] = 0;
                        t.bytes.clear();
                    }
                }
            }),
            "batch",
        ),
        (
            "logits_pixel_values_f64",
            Box::new(|ts| {
                let t = tensor(ts, "pixel_values");
                t.dtype = Dtype::F64;
                t.shape[3] /= 2;
            }),
            "pixel_values",
        ),
        (
            "logits_pixel_values_wrong_resolution",
            Box::new(|ts| {
                let t = tensor(ts, "pixel_values");
                t.shape = vec![2, 3, 16, 64];
            }),
            "pixel_values",
        ),
        (
            "logits_input_ids_beyond_vocab",
            Box::new(|ts| {
                let t = tensor(ts, "input_ids");
                t.bytes[..8].copy_from_slice(&1000i64.to_le_bytes());
            }),
            "input_ids",
        ),
        (
            "logits_input_ids_negative",
            Box::new(|ts| {
                let t = tensor(ts, "input_ids");
                t.bytes[8..16].copy_from_slice(&(-5i64).to_le_bytes());
            }),
            "input_ids",
        ),
        (
            "logits_input_ids_empty",
            Box::new(|ts| {
                for k in ["input_ids", "attention_mask"] {
                    let t = tensor(ts, k);
                    t.shape = vec![2, 0];
                    t.bytes.clear();
                }
            }),
            "input_ids",
        ),
        (
            "logits_decoder_ids_beyond_vocab",
            Box::new(|ts| {
                let t = tensor(ts, "decoder_input_ids");
                t.bytes[8..16].copy_from_slice(&500i64.to_le_bytes());
            }),
            "decoder_input_ids",
        ),
        (
            "logits_qformer_ids_beyond_vocab",
            Box::new(|ts| {
                let t = tensor(ts, "qformer_input_ids");
                let n = t.bytes.len();
                t.bytes[n - 8..].copy_from_slice(&77i64.to_le_bytes());
            }),
            "qformer_input_ids",
        ),
        (
            "logits_qformer_ids_missing",
            Box::new(|ts| ts.retain(|t| t.name != "qformer_input_ids")),
            "qformer_input_ids",
        ),
    ];
    for (name, edit, needle) in edits {
        let (d, _, inputs, args) = setup(t, name);
        edit_st(&inputs, edit);
        t.case(name, &d, args)
            .needle("in.safetensors")
            .needle(needle);
    }
}

fn inspect_cases(t: &mut Suite) {
    let d = t.dir("inspect_not_a_model_dir");
    let m = d.join("calibration");
    copy_dir(&cal(), &m);
    t.case(
        "inspect_not_a_model_dir",
        &d,
        Argv::new(&["inspect", "--json", "--model", s(&m)]),
    )
    .needle("config.json");

    let d = t.dir("inspect_model_is_a_file");
    let f = d.join("model.txt");
    std::fs::write(&f, "not a directory").unwrap();
    t.case(
        "inspect_model_is_a_file",
        &d,
        Argv::new(&["inspect", "--model", s(&f)]),
    )
    .needle("model.txt");

    let d = t.dir("inspect_bitmask_parts_garbage");
    let m = t.model(&d, "instructblip-t5-a");
    // A `.bitmask` part with no other parts of its group.
    edit_st(&m.join("model.safetensors"), |ts| {
        ts.push(Tensor {
            name: "vision_model.encoder.layers.0.mlp.fc1.bitmask".into(),
            dtype: Dtype::U8,
            shape: vec![3],
            bytes: vec![1, 2, 3],
        })
    });
    t.case(
        "inspect_bitmask_parts_garbage",
        &d,
        Argv::new(&["inspect", "--model", s(&m)]),
    )
    .needle("vision_model.encoder.layers.0.mlp.fc1");
}

fn prune_args(model: &Path, out: &Path) -> Argv {
    Argv::new(&[
        "prune",
        "--model",
        s(model),
        "--method",
        "wanda",
        "--sparsity",
        "0.5",
        "--calibration",
        s(&cal().join("captions.json")),
        "--images",
        s(&cal()),
        "--samples",
        "2",
        "--out",
        s(out),
    ])
}

fn prune_cases(t: &mut Suite) {
    let a = "instructblip-t5-a";
    let flag_cases: &[PruneFlagCase] = &[
        (
            "prune_sparsity_above_one",
            &[("--sparsity", "1.5")],
            &[],
            "--sparsity",
        ),
        (
            "prune_sparsity_nan",
            &[("--sparsity", "NaN")],
            &[],
            "--sparsity",
        ),
        (
            "prune_sparsity_inf",
            &[("--sparsity", "inf")],
            &[],
            "--sparsity",
        ),
        (
            "prune_sparsity_zero",
            &[("--sparsity", "0")],
            &[],
            "--sparsity",
        ),
        (
            "prune_pattern_3_of_2",
            &[("--pattern", "3:2")],
            &[],
            "--pattern",
        ),
        (
            "prune_pattern_0_of_4",
            &[("--pattern", "0:4")],
            &[],
            "--pattern",
        ),
        (
            "prune_pattern_letters",
            &[("--pattern", "a:b")],
            &[],
            "--pattern",
        ),
        (
            "prune_sparsity_contradicts_pattern",
            &[("--sparsity", "0.7"), ("--pattern", "2:4")],
            &[],
            "--sparsity",
        ),
        (
            "prune_samples_zero",
            &[("--samples", "0")],
            &[],
            "--samples",
        ),
        (
            "prune_vision_above_one",
            &[("--vision", "1.2")],
            &[],
            "--vision",
        ),
        (
            "prune_qformer_nan",
            &[("--qformer", "NaN")],
            &[],
            "--qformer",
        ),
        (
            "prune_owl_lambda_negative",
            &[("--allocation", "owl"), ("--owl-lambda", "-1")],
            &[],
            "--owl-lambda",
        ),
        (
            "prune_owl_m_nan",
            &[("--allocation", "owl"), ("--owl-m", "NaN")],
            &[],
            "--owl-m",
        ),
        (
            "prune_owl_without_calibration",
            &[("--method", "magnitude"), ("--allocation", "owl")],
            &["--calibration", "--images", "--samples"],
            "--calibration",
        ),
        (
            "prune_calibration_without_images",
            &[],
            &["--images"],
            "--images",
        ),
    ];
    for (name, flags, unset, needle) in flag_cases {
        let d = t.dir(name);
        let m = t.model(&d, a);
        let mut args = prune_args(&m, &d.join("out"));
        for f in *unset {
            args = args.unset(f);
        }
        for (f, v) in *flags {
            args = args.set(f, v);
        }
        t.case(name, &d, args).needle(needle);
    }

    // Calibration lists.
    let list_cases: &[(&str, &str, &[&str])] = &[
        ("prune_calibration_not_json", "[{\"image\": ", &[]),
        (
            "prune_calibration_wrong_fields",
            r#"[{"image": "images/a.png", "text": "a red circle above a small blue square"}]"#,
            &["caption"],
        ),
        (
            "prune_calibration_image_escapes_root",
            r#"[{"image": "../../../../etc/hostname", "caption": "a red circle above a small blue square"}]"#,
            &["image"],
        ),
        (
            "prune_calibration_is_an_object",
            r#"{"image": "images/a.png", "caption": "a red circle"}"#,
            &[],
        ),
    ];
    for (name, text, needles) in list_cases {
        let d = t.dir(name);
        let m = t.model(&d, a);
        let list = d.join("cal.json");
        std::fs::write(&list, text).unwrap();
        let c = t
            .case(
                name,
                &d,
                prune_args(&m, &d.join("out"))
                    .set("--calibration", s(&list))
                    .set("--samples", "1"),
            )
            .needle("cal.json");
        for n in *needles {
            c.needles.push(vec![n.to_string()]);
        }
    }

    let d = t.dir("prune_calibration_image_not_an_image");
    let m = t.model(&d, a);
    let images = d.join("images");
    std::fs::create_dir(&images).unwrap();
    std::fs::write(images.join("fake.png"), "this is text, not a PNG").unwrap();
    let list = d.join("cal.json");
    std::fs::write(
        &list,
        r#"[{"image": "fake.png", "caption": "a red circle above a small blue square"}]"#,
    )
    .unwrap();
    t.case(
        "prune_calibration_image_not_an_image",
        &d,
        prune_args(&m, &d.join("out"))
            .set("--calibration", s(&list))
            .set("--images", s(&images))
            .set("--samples", "1"),
    )
    .needle("fake.png");

    let d = t.dir("prune_images_is_a_file");
    let m = t.model(&d, a);
    let f = d.join("images.txt");
    std::fs::write(&f, "x").unwrap();
    t.case(
        "prune_images_is_a_file",
        &d,
        prune_args(&m, &d.join("out")).set("--images", s(&f)),
    )
    .any(&["--images", s(&f)]);

    // Outputs.
    let d = t.dir("prune_out_inside_model_dir");
    let m = t.model(&d, a);
    t.case(
        "prune_out_inside_model_dir",
        &d,
        prune_args(&m, &m.join("pruned")),
    )
    .any(&["--out", s(&m.join("pruned"))]);

    let d = t.dir("prune_out_is_the_calibration_list");
    let m = t.model(&d, a);
    let list = d.join("captions.json");
    std::fs::copy(cal().join("captions.json"), &list).unwrap();
    t.case(
        "prune_out_is_the_calibration_list",
        &d,
        prune_args(&m, &list).set("--calibration", s(&list)),
    )
    .any(&["--out", s(&list)]);

    let d = t.dir("prune_out_not_empty");
    let m = t.model(&d, a);
    let out = d.join("occupied");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    t.case("prune_out_not_empty", &d, prune_args(&m, &out))
        .needle("occupied");
}

fn repair_args(pruned: &Path, dense: &Path, out: &Path) -> Argv {
    Argv::new(&[
        "repair",
        "--model",
        s(pruned),
        "--dense",
        s(dense),
        "--data",
        s(&cal().join("captions.json")),
        "--images",
        s(&cal()),
        "--out",
        s(out),
        "--steps",
        "1",
        "--batch-size",
        "2",
    ])
}

fn repair_cases(t: &mut Suite, pruned: &Path) {
    let a = "instructblip-t5-a";
    let setup = |t: &Suite, name: &str| {
        let d = t.dir(name);
        let p = d.join("pruned");
        copy_dir(pruned, &p);
        let dense = t.model(&d, a);
        let args = repair_args(&p, &dense, &d.join("out"));
        (d, p, dense, args)
    };
    let flag_cases: &[RepairFlagCase] = &[
        ("repair_rank_zero", &[("--rank", "0")], &["rank"]),
        ("repair_rank_huge", &[("--rank", "4096")], &["rank"]),
        ("repair_lr_zero", &[("--lr", "0")], &["lr"]),
        ("repair_lr_nan", &[("--lr", "NaN")], &["lr"]),
        (
            "repair_lambda_negative",
            &[("--lambda", "-0.5")],
            &["lambda"],
        ),
        ("repair_lambda_nan", &[("--lambda", "NaN")], &["lambda"]),
        (
            "repair_temperature_zero",
            &[("--temperature", "0")],
            &["temperature"],
        ),
        (
            "repair_batch_size_zero",
            &[("--batch-size", "0")],
            &["--batch-size", "batch_size"],
        ),
        (
            "repair_kl_reduction_unknown",
            &[("--kl-reduction", "sum")],
            &["--kl-reduction"],
        ),
    ];
    for (name, flags, needles) in flag_cases {
        let (d, _, _, mut args) = setup(t, name);
        for (f, v) in *flags {
            args = args.set(f, v);
        }
        t.case(name, &d, args).any(needles);
    }

    let (d, p, _, args) = setup(t, "repair_dense_is_the_pruned_model");
    t.case(
        "repair_dense_is_the_pruned_model",
        &d,
        args.set("--dense", s(&p)),
    )
    .needle("--dense");

    let (d, _, _, args) = setup(t, "repair_dense_of_another_architecture");
    let llama = t.model(&d, "instructblip-llama-gqa");
    t.case(
        "repair_dense_of_another_architecture",
        &d,
        args.set("--dense", s(&llama)),
    )
    .needle("instructblip-llama-gqa");

    let (d, _, _, args) = setup(t, "repair_without_dense");
    t.case("repair_without_dense", &d, args.unset("--dense"))
        .needle("--dense");

    let (d, p, _, args) = setup(t, "repair_out_inside_pruned_dir");
    t.case(
        "repair_out_inside_pruned_dir",
        &d,
        args.set("--out", s(&p.join("repaired"))),
    )
    .any(&["--out", s(&p.join("repaired"))]);

    let (d, _, _, args) = setup(t, "repair_out_is_the_data_file");
    let list = d.join("train.json");
    std::fs::copy(cal().join("captions.json"), &list).unwrap();
    t.case(
        "repair_out_is_the_data_file",
        &d,
        args.set("--data", s(&list)).set("--out", s(&list)),
    )
    .any(&["--out", s(&list)]);

    let (d, _, _, args) = setup(t, "repair_out_not_empty");
    let out = d.join("occupied");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    t.case("repair_out_not_empty", &d, args.set("--out", s(&out)))
        .needle("occupied");

    let (d, _, _, args) = setup(t, "repair_data_not_json");
    let list = d.join("train.json");
    std::fs::write(&list, "image,caption\na.png,a red circle\n").unwrap();
    t.case("repair_data_not_json", &d, args.set("--data", s(&list)))
        .needle("train.json");

    let (d, _, _, args) = setup(t, "repair_data_wrong_fields");
    let list = d.join("train.json");
    std::fs::write(
        &list,
        r#"[{"img": "images/a.png", "text": "a red circle above a small blue square"}]"#,
    )
    .unwrap();
    t.case("repair_data_wrong_fields", &d, args.set("--data", s(&list)))
        .needle("train.json");

    let (d, _, _, args) = setup(t, "repair_val_missing");
    t.case(
        "repair_val_missing",
        &d,
        args.set("--val", s(&d.join("val.json"))),
    )
    .needle("val.json");

    let (d, p, _, args) = setup(t, "repair_masks_garbage");
    std::fs::write(p.join("masks.safetensors"), noise(777, 4)).unwrap();
    t.case("repair_masks_garbage", &d, args)
        .needle("masks.safetensors");

    // TOML configurations.
    let (d, _, _, _) = setup(t, "repair_config_not_toml");
    let cfg = d.join("r.toml");
    std::fs::write(&cfg, "pruned = [unclosed\n").unwrap();
    t.case(
        "repair_config_not_toml",
        &d,
        Argv::new(&["repair", "--config", s(&cfg)]),
    )
    .needle("r.toml")
    .out(&d.join("out"));

    let (d, p, dense, _) = setup(t, "repair_config_steps_wrong_type");
    let cfg = d.join("r.toml");
    std::fs::write(
        &cfg,
        format!(
            "pruned = {:?}\ndense = {:?}\nout = {:?}\n[data]\ntrain = {:?}\nimages = {:?}\n[train]\nsteps = \"ten\"\n",
            s(&p),
            s(&dense),
            s(&d.join("out")),
            s(&cal().join("captions.json")),
            s(&cal()),
        ),
    )
    .unwrap();
    t.case(
        "repair_config_steps_wrong_type",
        &d,
        Argv::new(&["repair", "--config", s(&cfg)]),
    )
    .needle("r.toml")
    .needle("steps")
    .out(&d.join("out"))
    .input(&cal());
}

fn eval_args(model: &Path, out: &Path) -> Argv {
    Argv::new(&[
        "eval",
        "--model",
        s(model),
        "--task",
        "vqav2",
        "--annotations",
        s(&data("annotations/vqa_val_eval.json")),
        "--images",
        s(&data("images/coco")),
        "--out",
        s(out),
        "--beams",
        "1",
        "--max-new-tokens",
        "3",
    ])
}

fn eval_cases(t: &mut Suite) {
    let a = "instructblip-t5-a";
    let setup = |t: &Suite, name: &str| {
        let d = t.dir(name);
        let m = t.model(&d, a);
        let args = eval_args(&m, &d.join("pred.json"));
        (d, m, args)
    };
    let flag_cases: &[FlagCase] = &[
        ("eval_unknown_task", &[("--task", "vqav3")], "--task"),
        (
            "eval_workers_100000",
            &[("--workers", "100000")],
            "--workers",
        ),
        ("eval_beams_zero", &[("--beams", "0")], "--beams"),
        (
            "eval_batch_size_zero",
            &[("--batch-size", "0")],
            "--batch-size",
        ),
        (
            "eval_max_new_tokens_zero",
            &[("--max-new-tokens", "0")],
            "--max-new-tokens",
        ),
        (
            "eval_min_above_max",
            &[("--min-new-tokens", "5"), ("--max-new-tokens", "2")],
            "--min-new-tokens",
        ),
        (
            "eval_repetition_penalty_nan",
            &[("--repetition-penalty", "NaN")],
            "--repetition-penalty",
        ),
        (
            "eval_length_penalty_inf",
            &[("--length-penalty", "inf")],
            "--length-penalty",
        ),
    ];
    for (name, flags, needle) in flag_cases {
        let (d, _, mut args) = setup(t, name);
        for (f, v) in *flags {
            args = args.set(f, v);
        }
        t.case(name, &d, args).needle(needle);
    }

    let (d, _, args) = setup(t, "eval_images_dir_missing");
    t.case(
        "eval_images_dir_missing",
        &d,
        args.set("--images", s(&d.join("no-images"))),
    )
    .any(&["--images", s(&d.join("no-images"))]);

    let (d, _, args) = setup(t, "eval_images_is_a_file");
    let f = d.join("images.txt");
    std::fs::write(&f, "x").unwrap();
    t.case("eval_images_is_a_file", &d, args.set("--images", s(&f)))
        .any(&["--images", s(&f)]);

    let (d, _, args) = setup(t, "eval_ground_truth_array_of_numbers");
    let gt = d.join("gt.json");
    std::fs::write(&gt, "[1, 2, 3]").unwrap();
    t.case(
        "eval_ground_truth_array_of_numbers",
        &d,
        args.add(&["--ground-truth", s(&gt)]),
    )
    .needle("gt.json");

    let (d, _, args) = setup(t, "eval_caption_ground_truth_is_vqa");
    let gt = data("annotations/v2_mscoco_val2014_annotations.json");
    t.case(
        "eval_caption_ground_truth_is_vqa",
        &d,
        args.set("--task", "coco-caption")
            .set(
                "--annotations",
                s(&data("annotations/coco_karpathy_test.json")),
            )
            .add(&["--ground-truth", s(&gt)]),
    )
    .needle("v2_mscoco_val2014_annotations.json");

    let (d, _, args) = setup(t, "eval_gqa_task_on_a_vqa_list");
    t.case("eval_gqa_task_on_a_vqa_list", &d, args.set("--task", "gqa"))
        .needle("vqa_val_eval.json");

    let (d, _, args) = setup(t, "eval_out_is_the_annotations");
    let ann = d.join("vqa_val_eval.json");
    std::fs::copy(data("annotations/vqa_val_eval.json"), &ann).unwrap();
    t.case(
        "eval_out_is_the_annotations",
        &d,
        args.set("--annotations", s(&ann)).set("--out", s(&ann)),
    )
    .any(&["--out", s(&ann)]);

    let (d, _, args) = setup(t, "eval_out_is_the_ground_truth");
    let gt = d.join("gt.json");
    std::fs::copy(data("annotations/v2_mscoco_val2014_annotations.json"), &gt).unwrap();
    t.case(
        "eval_out_is_the_ground_truth",
        &d,
        args.set("--out", s(&gt)).add(&["--ground-truth", s(&gt)]),
    )
    .any(&["--out", s(&gt)]);

    let (d, m, args) = setup(t, "eval_out_is_model_config");
    let cfg = m.join("config.json");
    t.case("eval_out_is_model_config", &d, args.set("--out", s(&cfg)))
        .any(&["--out", s(&cfg)]);

    let (d, _, args) = setup(t, "eval_out_is_a_directory");
    let o = d.join("predictions");
    std::fs::create_dir(&o).unwrap();
    t.case("eval_out_is_a_directory", &d, args.set("--out", s(&o)))
        .any(&["--out", s(&o)]);

    let list_cases: &[(&str, &str, &[&str])] = &[
        ("eval_annotations_empty_list", "[]", &[]),
        (
            "eval_annotations_duplicate_question_ids",
            r#"[{"image": "val2014/COCO_val2014_000000000042.jpg", "question": "What color is the ball?", "question_id": 42000},
                {"image": "val2014/COCO_val2014_000000000073.jpg", "question": "How many balls are there?", "question_id": 42000}]"#,
            &["42000"],
        ),
        (
            "eval_annotations_image_escapes_root",
            r#"[{"image": "../../../../../etc/hostname", "question": "What?", "question_id": 1}]"#,
            &["image"],
        ),
        (
            "eval_annotations_question_id_float",
            r#"[{"image": "val2014/COCO_val2014_000000000042.jpg", "question": "What?", "question_id": 1.5}]"#,
            &["question_id"],
        ),
    ];
    for (name, text, needles) in list_cases {
        let (d, _, args) = setup(t, name);
        let ann = d.join("ann.json");
        std::fs::write(&ann, text).unwrap();
        let c = t
            .case(name, &d, args.set("--annotations", s(&ann)))
            .needle("ann.json");
        for n in *needles {
            c.needles.push(vec![n.to_string()]);
        }
    }
}

fn score_args(task: &str, predictions: &Path, annotations: &[PathBuf]) -> Argv {
    let mut a = Argv::new(&["score", "--task", task, "--predictions", s(predictions)]);
    a.0.push("--annotations".into());
    a.0.extend(annotations.iter().map(|p| s(p).to_string()));
    a
}

fn score_cases(t: &mut Suite) {
    let vqa_gt = || {
        vec![
            metrics("vqa_annotations.json"),
            metrics("vqa_questions.json"),
        ]
    };
    let gqa_gt = || vec![metrics("gqa_annotations.json")];
    // Duplicated question ids: the result file cannot tell the predictions apart.
    for (name, task, src, gt) in [
        (
            "score_vqav2_duplicate_question_id",
            "vqav2",
            "vqa_predictions.json",
            vqa_gt(),
        ),
        (
            "score_gqa_duplicate_question_id",
            "gqa",
            "gqa_predictions.json",
            gqa_gt(),
        ),
    ] {
        let d = t.dir(name);
        let preds = d.join("dup.json");
        let mut v = read_json(&metrics(src));
        let arr = v.as_array_mut().unwrap();
        let mut first = arr[0].clone();
        let id = first["question_id"].clone();
        first["answer"] = json!("something else");
        arr.insert(3, first);
        write_json(&preds, &v);
        let id = match id {
            Value::String(s) => s,
            other => other.to_string(),
        };
        t.case(name, &d, score_args(task, &preds, &gt))
            .needle("dup.json")
            .needle(&id);
    }

    let d = t.dir("score_predictions_not_json");
    let preds = d.join("pred.json");
    std::fs::write(&preds, "question_id,answer\n1,yes\n").unwrap();
    t.case(
        "score_predictions_not_json",
        &d,
        score_args("vqav2", &preds, &vqa_gt()),
    )
    .needle("pred.json");

    let d = t.dir("score_predictions_an_object");
    let preds = d.join("pred.json");
    std::fs::write(&preds, r#"{"question_id": 301024, "answer": "yes"}"#).unwrap();
    t.case(
        "score_predictions_an_object",
        &d,
        score_args("gqa", &preds, &gqa_gt()),
    )
    .needle("pred.json");

    let d = t.dir("score_answer_is_a_number");
    let preds = d.join("pred.json");
    let mut v = read_json(&metrics("vqa_predictions.json"));
    v[0]["answer"] = json!(3);
    write_json(&preds, &v);
    t.case(
        "score_answer_is_a_number",
        &d,
        score_args("vqav2", &preds, &vqa_gt()),
    )
    .needle("pred.json")
    .needle("answer");

    let d = t.dir("score_annotations_missing");
    t.case(
        "score_annotations_missing",
        &d,
        score_args(
            "coco-caption",
            &metrics("caption_predictions.json"),
            &[d.join("absent.json")],
        ),
    )
    .needle("absent.json");

    let d = t.dir("score_caption_image_not_in_ground_truth");
    let preds = d.join("pred.json");
    let mut v = read_json(&metrics("caption_predictions.json"));
    v.as_array_mut()
        .unwrap()
        .push(json!({"image_id": 987654321, "caption": "a dog"}));
    write_json(&preds, &v);
    t.case(
        "score_caption_image_not_in_ground_truth",
        &d,
        score_args("coco-caption", &preds, &[metrics("caption_gt.json")]),
    )
    .needle("987654321");

    let d = t.dir("score_vqa_question_not_in_ground_truth");
    let preds = d.join("pred.json");
    let mut v = read_json(&metrics("vqa_predictions.json"));
    v.as_array_mut()
        .unwrap()
        .push(json!({"question_id": 123456789, "answer": "yes"}));
    write_json(&preds, &v);
    t.case(
        "score_vqa_question_not_in_ground_truth",
        &d,
        score_args("vqav2", &preds, &vqa_gt()),
    )
    .needle("123456789");

    let d = t.dir("score_unknown_task");
    t.case(
        "score_unknown_task",
        &d,
        score_args("vqa", &metrics("vqa_predictions.json"), &vqa_gt()),
    )
    .needle("--task");
}

fn export_cases(t: &mut Suite, pruned: &Path) {
    let args =
        |m: &Path, out: &Path| Argv::new(&["export", s(m), "--format", "bitmask", "--out", s(out)]);
    let d = t.dir("export_not_a_model_dir");
    let m = d.join("calibration");
    copy_dir(&cal(), &m);
    t.case("export_not_a_model_dir", &d, args(&m, &d.join("out")))
        .any(&["config.json", "model.safetensors"]);

    let d = t.dir("export_out_inside_model_dir");
    let m = d.join("pruned");
    copy_dir(pruned, &m);
    t.case(
        "export_out_inside_model_dir",
        &d,
        args(&m, &m.join("exported")),
    )
    .any(&["--out", s(&m.join("exported"))]);

    let d = t.dir("export_out_is_the_model_dir");
    let m = d.join("pruned");
    copy_dir(pruned, &m);
    t.case("export_out_is_the_model_dir", &d, args(&m, &m))
        .any(&["--out", s(&m)]);

    let d = t.dir("export_out_is_a_file");
    let m = d.join("pruned");
    copy_dir(pruned, &m);
    let f = d.join("file.txt");
    std::fs::write(&f, "mine").unwrap();
    t.case("export_out_is_a_file", &d, args(&m, &f))
        .needle("file.txt");

    let d = t.dir("export_masks_garbage");
    let m = d.join("pruned");
    copy_dir(pruned, &m);
    std::fs::write(m.join("masks.safetensors"), noise(999, 5)).unwrap();
    t.case("export_masks_garbage", &d, args(&m, &d.join("out")))
        .needle("masks.safetensors");

    let d = t.dir("export_weights_truncated");
    let m = d.join("pruned");
    copy_dir(pruned, &m);
    let w = m.join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() - 1000]).unwrap();
    t.case("export_weights_truncated", &d, args(&m, &d.join("out")))
        .needle("model.safetensors");

    let d = t.dir("export_unknown_format");
    let m = d.join("pruned");
    copy_dir(pruned, &m);
    t.case(
        "export_unknown_format",
        &d,
        Argv::new(&[
            "export",
            s(&m),
            "--format",
            "csr",
            "--out",
            s(&d.join("out")),
        ]),
    )
    .needle("--format");
}

#[test]
fn hostile_inputs_fail_cleanly() {
    let started = Instant::now();
    let mut t = Suite::new();
    let shared = t.root.path().join("shared");
    let mut report = String::new();
    let mut failures = Vec::new();

    // Controls: the unbroken commands succeed (a pruned model for repair and export, too).
    let dense = shared.join("dense");
    copy_dir(&fixture("instructblip-t5-a"), &dense);
    let pruned = shared.join("pruned");
    let controls: Vec<(&str, Argv)> = vec![
        (
            "control_prune_magnitude",
            Argv::new(&[
                "prune",
                "--model",
                s(&dense),
                "--method",
                "magnitude",
                "--sparsity",
                "0.7",
                "--out",
                s(&pruned),
            ]),
        ),
        (
            "control_prune_wanda",
            prune_args(&dense, &shared.join("wanda")),
        ),
        ("control_generate", generate_args(&dense, &image0())),
        (
            "control_logits",
            Argv::new(&[
                "logits",
                "--model",
                s(&dense),
                "--inputs",
                s(&dense.join("reference.safetensors")),
                "--out",
                s(&shared.join("logits.safetensors")),
            ]),
        ),
        (
            "control_inspect",
            Argv::new(&["inspect", "--model", s(&dense)]),
        ),
        (
            "control_repair",
            repair_args(&pruned, &dense, &shared.join("repaired")),
        ),
        ("control_eval", eval_args(&dense, &shared.join("pred.json"))),
        (
            "control_score",
            score_args(
                "vqav2",
                &metrics("vqa_predictions.json"),
                &[
                    metrics("vqa_annotations.json"),
                    metrics("vqa_questions.json"),
                ],
            ),
        ),
        (
            "control_export",
            Argv::new(&[
                "export",
                s(&pruned),
                "--format",
                "bitmask",
                "--out",
                s(&shared.join("bitmask")),
            ]),
        ),
    ];
    for (name, args) in &controls {
        let (ok, line) = t.control(name, args);
        if ok {
            writeln!(report, "| {name} | ok | {line} |").unwrap();
        } else {
            writeln!(report, "| {name} | FAIL | {line} |").unwrap();
            failures.push(format!("{name}: the unbroken command failed: {line}"));
        }
    }
    assert!(
        pruned.join("model.safetensors").exists(),
        "the pruned model the repair and export cases need was not written:\n{report}"
    );

    generate_cases(&mut t);
    model_file_cases(&mut t);
    logits_cases(&mut t);
    inspect_cases(&mut t);
    prune_cases(&mut t);
    repair_cases(&mut t, &pruned);
    eval_cases(&mut t);
    score_cases(&mut t);
    export_cases(&mut t, &pruned);

    let setup_s = started.elapsed().as_secs_f64();
    let mut passed = 0;
    for case in &t.cases {
        let (result, summary, seconds) = check(&t, case);
        match result {
            Ok(()) => {
                passed += 1;
                writeln!(report, "| {} | pass | {seconds:.2}s {summary} |", case.name).unwrap();
            }
            Err(violations) => {
                let v = violations.join("; ");
                writeln!(
                    report,
                    "| {} | FAIL | {seconds:.2}s {summary} — {v} |",
                    case.name
                )
                .unwrap();
                failures.push(format!(
                    "{}: {v}\n    args: {:?}\n    got: {summary}",
                    case.name,
                    case.args
                        .iter()
                        .map(|a| a.replace(s(t.root.path()), "$TMP"))
                        .collect::<Vec<_>>()
                ));
            }
        }
    }
    let total = t.cases.len();
    eprintln!(
        "hostile: {passed}/{total} cases pass ({:.1}s, controls and setup {setup_s:.1}s)\n\
         | case | result | detail |\n|---|---|---|\n{report}",
        started.elapsed().as_secs_f64()
    );
    assert!(total >= 60, "only {total} cases");
    assert!(
        failures.is_empty(),
        "{} of {total} hostile cases (and controls) violate the contract:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
