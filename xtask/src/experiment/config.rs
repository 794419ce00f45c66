//! The study a TOML file describes (see `configs/shapes-tiny.toml`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ressa_data::shapes::ShapesConfig;
use ressa_prune::Method;
use ressa_prune::calibrate::AllocationKind;
use ressa_train::TrainConfig;
use ressa_train::pretrain::PretrainConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    pub name: String,
    /// Where artefacts and results go (default `target/experiments/<name>`).
    #[serde(default)]
    pub work_dir: Option<PathBuf>,
    pub model: ModelSource,
    pub data: DataSource,
    #[serde(default)]
    pub calibration: Calibration,
    /// One `[grid]` table, or several `[[grid]]` tables (e.g. a second, smaller grid for OWL).
    #[serde(default, deserialize_with = "one_or_many")]
    pub grid: Vec<Grid>,
    #[serde(default)]
    pub split: Option<Split>,
    #[serde(default)]
    pub towers: Option<Towers>,
    #[serde(default)]
    pub ressa: Option<TrainConfig>,
    #[serde(default)]
    pub eval: Eval,
}

/// A model directory, or the toy model trained from scratch.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSource {
    /// An HF model directory (the dense model).
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Train this `config.json` from scratch on the data's training split.
    #[serde(default)]
    pub train_config: Option<PathBuf>,
    #[serde(default)]
    pub pretrain: PretrainConfig,
    /// Initial weights ~ U(±init_scale) (norm weights 1); default: `transformers`'
    /// initialisation (`write_initial_checkpoint`).
    #[serde(default)]
    pub init_scale: Option<f32>,
    /// σ of named tensors at initialisation (HF keys), instead of their config's
    /// `initializer_range`: e.g. `"vision_model.embeddings.position_embedding" = 5.0`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub init_std: BTreeMap<String, f32>,
}

/// Generated shapes data, or LAVIS files on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSource {
    #[serde(default)]
    pub shapes: Option<ShapesConfig>,
    /// A directory laid out like the shapes output (`annotations/vqa_{split}.json`, …,
    /// `images/`), for real data converted to that layout.
    #[serde(default)]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Calibration {
    pub samples: usize,
}

impl Default for Calibration {
    fn default() -> Self {
        Self { samples: 32 }
    }
}

/// Methods × settings × allocations, vision and language pruned alike.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grid {
    pub methods: Vec<Method>,
    /// "50%", "70%", "2:4", "4:8", …
    pub settings: Vec<String>,
    /// "uniform" (every matrix at the tower's sparsity) and/or "owl" (OWL's per-block
    /// sparsities). OWL cells are made for the unstructured settings only; N:M settings run
    /// uniform only (a grid whose allocations and settings leave no cell is an error).
    #[serde(default = "uniform_only")]
    pub allocations: Vec<AllocationKind>,
    /// OWL's outlier threshold `M` (default 5, the OWL paper's).
    #[serde(default = "owl_m")]
    pub owl_m: f64,
    /// OWL's spread `λ` (default 0.08, the OWL paper's).
    #[serde(default = "owl_lambda")]
    pub owl_lambda: f64,
    /// Run RESSA on every grid cell.
    #[serde(default = "yes")]
    pub ressa: bool,
}

fn yes() -> bool {
    true
}

fn uniform_only() -> Vec<AllocationKind> {
    vec![AllocationKind::Uniform]
}

fn owl_m() -> f64 {
    ressa_prune::OwlConfig::default().m
}

fn owl_lambda() -> f64 {
    ressa_prune::OwlConfig::default().lambda
}

/// A table or an array of tables, kept apart so serde's error names the bad field.
fn one_or_many<'de, D, T>(d: D) -> std::result::Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct V<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a table or an array of tables")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            map: A,
        ) -> std::result::Result<Vec<T>, A::Error> {
            T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(|t| vec![t])
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            seq: A,
        ) -> std::result::Result<Vec<T>, A::Error> {
            Vec::<T>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
        }
    }
    d.deserialize_any(V(std::marker::PhantomData))
}

/// Fixed-sum vision/language sweeps: for each sum, vision takes each value, language the rest.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Split {
    pub method: Method,
    pub sums: Vec<f64>,
    pub vision: Vec<f64>,
}

/// Language-only and vision-only pruning at these sparsities.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Towers {
    pub method: Method,
    pub sparsities: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Eval {
    /// Test questions scored per VQA task (the first N) unless the task says otherwise.
    pub vqa_items: usize,
    /// Test images captioned per caption task (the first N; 0 = no default caption task).
    pub caption_items: usize,
    pub batch_size: usize,
    pub max_answer_tokens: usize,
    pub max_caption_tokens: usize,
    /// Named tasks (`[[eval.tasks]]`); empty = the data directory's own test split:
    /// `vqa` (`annotations/vqa_test.json`, question types from
    /// `annotations/vqa_test_annotations.json` when it exists) and, if `caption_items > 0`,
    /// `caption` (`annotations/caption_test_eval.json`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<Task>,
    /// Data-parallel generation: this many copies of the model, each on its own thread,
    /// taking whole batches (the predictions are those of one device).
    #[serde(skip_serializing_if = "is_one")]
    pub devices: usize,
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

/// One evaluation task. Paths are relative to the data directory (or absolute).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Task {
    /// Unique, shown as the report's column (`VQAv2`, `GQA`, …).
    pub name: String,
    /// `vqa` or `caption`.
    pub kind: TaskKind,
    /// VQA: a list of {`question_id`, `question`, `image`, `answer`} — `answer` a list of human
    /// answers (VQA accuracy) or one string (GQA: exact match); optional `question_type` /
    /// `answer_type` per item. Caption: NoCaps eval format (`image`, `img_id`, `caption` list).
    pub file: PathBuf,
    /// VQA only: official VQAv2-style annotations (`{"annotations": [{question_id,
    /// question_type, answer_type}]}`) giving each question's type.
    #[serde(default)]
    pub question_types: Option<PathBuf>,
    /// The image root the file's `image` paths are relative to; default `images/`.
    #[serde(default)]
    pub images: Option<PathBuf>,
    /// Items scored (the first N); default `vqa_items` or `caption_items`.
    #[serde(default)]
    pub items: Option<usize>,
}

/// A task kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    Vqa,
    Caption,
}

impl TaskKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Vqa => "vqa",
            TaskKind::Caption => "caption",
        }
    }
}

/// A task with its kind parsed, its paths resolved and its item count fixed; `key` names it
/// in error messages (`eval.tasks[1]`, or `eval` for the default tasks).
#[derive(Debug, Clone)]
pub struct ResolvedTask {
    pub key: String,
    pub name: String,
    pub kind: TaskKind,
    pub file: PathBuf,
    pub question_types: Option<PathBuf>,
    pub images: PathBuf,
    pub items: usize,
}

impl Eval {
    /// The tasks to score, paths resolved against the data directory `data`.
    pub fn resolved_tasks(&self, data: &Path) -> Result<Vec<ResolvedTask>> {
        let ann = data.join("annotations");
        if self.tasks.is_empty() {
            let types = ann.join("vqa_test_annotations.json");
            let mut out = vec![ResolvedTask {
                key: "eval".into(),
                name: "vqa".into(),
                kind: TaskKind::Vqa,
                file: ann.join("vqa_test.json"),
                question_types: types.exists().then_some(types),
                images: data.join("images"),
                items: self.vqa_items,
            }];
            if self.caption_items > 0 {
                out.push(ResolvedTask {
                    key: "eval".into(),
                    name: "caption".into(),
                    kind: TaskKind::Caption,
                    file: ann.join("caption_test_eval.json"),
                    question_types: None,
                    images: data.join("images"),
                    items: self.caption_items,
                });
            }
            return Ok(out);
        }
        let mut out: Vec<ResolvedTask> = Vec::new();
        for (i, t) in self.tasks.iter().enumerate() {
            let key = format!("eval.tasks[{i}]");
            if t.name.trim().is_empty() {
                bail!("{key}.name: is empty");
            }
            if let Some(j) = out.iter().position(|o| o.name == t.name) {
                bail!(
                    "{key}.name: {:?} is also the name of eval.tasks[{j}]",
                    t.name
                );
            }
            let kind = t.kind;
            if kind == TaskKind::Caption && t.question_types.is_some() {
                bail!("{key}.question_types: only VQA tasks have question types");
            }
            let items = t.items.unwrap_or(match kind {
                TaskKind::Vqa => self.vqa_items,
                TaskKind::Caption => self.caption_items,
            });
            if items == 0 {
                bail!("{key}.items: 0 items (set `items` or eval.vqa_items / caption_items)");
            }
            out.push(ResolvedTask {
                key: key.clone(),
                name: t.name.clone(),
                kind,
                file: data.join(&t.file),
                question_types: t.question_types.as_ref().map(|p| data.join(p)),
                images: data.join(t.images.as_deref().unwrap_or(Path::new("images"))),
                items,
            });
        }
        Ok(out)
    }
}

impl ResolvedTask {
    /// Fails, naming the key, if a file of the task is missing.
    pub fn check_files(&self) -> Result<()> {
        let files = std::iter::once(("file", &self.file))
            .chain(self.question_types.iter().map(|p| ("question_types", p)));
        for (field, path) in files {
            if !path.is_file() {
                bail!(
                    "{}.{field}: {} does not exist (expected a {} annotation file)",
                    self.key,
                    path.display(),
                    self.kind.as_str()
                );
            }
        }
        if !self.images.is_dir() {
            bail!(
                "{}.images: {} is not a directory (expected the images the file names)",
                self.key,
                self.images.display()
            );
        }
        Ok(())
    }
}

impl Default for Eval {
    fn default() -> Self {
        Self {
            vqa_items: 300,
            caption_items: 60,
            batch_size: 32,
            max_answer_tokens: 4,
            max_caption_tokens: 24,
            tasks: Vec::new(),
            devices: 1,
        }
    }
}

impl ExperimentConfig {
    /// Reads the TOML; relative paths are relative to the current directory (the repository
    /// root under `cargo xtask`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
        let cfg: Self = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!("{}: {}", path.display(), e.to_string().replace('\n', " "))
        })?;
        cfg.validate()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        match (&self.model.dir, &self.model.train_config) {
            (Some(_), None) | (None, Some(_)) => {}
            _ => bail!("model: give exactly one of `dir` or `train_config`"),
        }
        // (the warm-up's prompts are matched against the data when training starts)
        self.model.pretrain.validate()?;
        match (&self.data.shapes, &self.data.dir) {
            (Some(_), None) | (None, Some(_)) => {}
            _ => bail!("data: give exactly one of `shapes` or `dir`"),
        }
        // Stage 0 reads the shapes world's scenes: a data directory must hold them.
        if self.model.pretrain.vision_steps > 0
            && let Some(dir) = &self.data.dir
        {
            let scenes = dir.join("annotations/scenes_train.json");
            if !scenes.is_file() {
                bail!(
                    "model.pretrain.vision_steps: {} is missing (vision pretraining reads the \
                     shapes world's scene annotations)",
                    scenes.display()
                );
            }
        }
        for (i, g) in self.grid.iter().enumerate() {
            let key = if self.grid.len() == 1 {
                "grid".to_string()
            } else {
                format!("grid[{i}]")
            };
            let mut unstructured = false;
            for s in &g.settings {
                let (pattern, _) =
                    parse_setting(s).map_err(|e| anyhow::anyhow!("{key}.settings: {e}"))?;
                unstructured |= pattern == "unstructured";
            }
            if g.allocations.is_empty() {
                bail!("{key}.allocations: is empty (expected e.g. [\"uniform\", \"owl\"])");
            }
            if g.allocations.iter().all(|a| *a == AllocationKind::Owl) && !unstructured {
                bail!(
                    "{key}.allocations: \"owl\" applies to unstructured settings (e.g. \"50%\") \
                     only, and {key}.settings has none"
                );
            }
            if !(g.owl_m.is_finite() && g.owl_m > 0.0) {
                bail!("{key}.owl_m: {} must be > 0", g.owl_m);
            }
            if !(0.0..1.0).contains(&g.owl_lambda) {
                bail!("{key}.owl_lambda: {} must be in [0, 1)", g.owl_lambda);
            }
        }
        if let Some(s) = &self.split {
            for sum in &s.sums {
                if !(0.0..2.0).contains(sum) {
                    bail!("split.sums: {sum} is not in [0, 2)");
                }
            }
        }
        if let Some(r) = &self.ressa {
            r.validate().map_err(|e| anyhow::anyhow!("ressa.{e}"))?;
        }
        if self.eval.devices == 0 {
            bail!("eval.devices: expected at least 1");
        }
        // Kinds, names and counts now; files now too when the data directory exists already
        // (generated shapes data is checked once generated).
        let data = self.data.dir.clone().unwrap_or_default();
        let tasks = self.eval.resolved_tasks(&data)?;
        if self.data.dir.is_some() {
            for t in &tasks {
                t.check_files()?;
            }
        }
        Ok(())
    }

    pub fn work_dir(&self) -> PathBuf {
        self.work_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("target/experiments").join(&self.name))
    }
}

/// "50%" → (unstructured, 0.5); "2:4" → (2:4, 0.5).
pub fn parse_setting(s: &str) -> Result<(String, f64)> {
    if let Some(p) = s.strip_suffix('%') {
        let v: f64 = p
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{s:?}: expected e.g. \"50%\" or \"2:4\""))?;
        if !(0.0..100.0).contains(&v) {
            bail!("{s:?}: a sparsity must be in [0 %, 100 %)");
        }
        return Ok(("unstructured".into(), v / 100.0));
    }
    let (n, m) = s
        .split_once(':')
        .ok_or_else(|| anyhow::anyhow!("{s:?}: expected e.g. \"50%\" or \"2:4\""))?;
    let (n, m): (usize, usize) = (
        n.trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{s:?}: bad N"))?,
        m.trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{s:?}: bad M"))?,
    );
    if n == 0 || n >= m {
        bail!("{s:?}: expected 0 < N < M");
    }
    Ok((format!("{n}:{m}"), n as f64 / m as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configs(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../configs")
            .join(name)
    }

    /// A config over a data directory holding `files` (created empty).
    /// `configs/shapes-paper-scratch.toml` edited by `edit` (given the text and the temporary
    /// directory), written as `s.toml` in that directory and read.
    fn scratch_edited(
        edit: impl FnOnce(String, &Path) -> String,
    ) -> (tempfile::TempDir, Result<ExperimentConfig>) {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("s.toml");
        let base = std::fs::read_to_string(configs("shapes-paper-scratch.toml")).unwrap();
        std::fs::write(&path, edit(base, tmp.path())).unwrap();
        let cfg = ExperimentConfig::from_file(&path);
        (tmp, cfg)
    }

    fn with_data(files: &[&str], tail: &str) -> (tempfile::TempDir, Result<ExperimentConfig>) {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir_all(data.join("images")).unwrap();
        for f in files {
            let p = data.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, "[]").unwrap();
        }
        let text = format!(
            "name = \"t\"\n[model]\ndir = \"m\"\n[data]\ndir = {:?}\n{tail}",
            data.display().to_string()
        );
        let path = tmp.path().join("study.toml");
        std::fs::write(&path, text).unwrap();
        let cfg = ExperimentConfig::from_file(&path);
        (tmp, cfg)
    }

    const FOUR_TASKS: &str = r#"
[[eval.tasks]]
name = "VQAv2"
kind = "vqa"
file = "annotations/vqav2_test.json"
question_types = "annotations/vqav2_test_annotations.json"
[[eval.tasks]]
name = "OK-VQA"
kind = "vqa"
file = "annotations/okvqa_test.json"
items = 7
[[eval.tasks]]
name = "GQA"
kind = "vqa"
file = "annotations/gqa_testdev.json"
images = "gqa_images"
[[eval.tasks]]
name = "NoCaps"
kind = "caption"
file = "annotations/nocaps_val_eval.json"
"#;

    const FOUR_FILES: [&str; 6] = [
        "annotations/vqav2_test.json",
        "annotations/vqav2_test_annotations.json",
        "annotations/okvqa_test.json",
        "annotations/gqa_testdev.json",
        "annotations/nocaps_val_eval.json",
        "gqa_images/.keep",
    ];

    #[test]
    fn several_tasks_load_in_order_with_their_kinds_items_and_paths() {
        let (tmp, cfg) = with_data(&FOUR_FILES, FOUR_TASKS);
        let cfg = cfg.unwrap();
        let data = tmp.path().join("data");
        let tasks = cfg.eval.resolved_tasks(&data).unwrap();
        let names: Vec<_> = tasks.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["VQAv2", "OK-VQA", "GQA", "NoCaps"]);
        let kinds: Vec<_> = tasks.iter().map(|t| t.kind).collect();
        assert_eq!(
            kinds,
            [
                TaskKind::Vqa,
                TaskKind::Vqa,
                TaskKind::Vqa,
                TaskKind::Caption
            ]
        );
        // Items: the task's own, else the default of its kind.
        let items: Vec<_> = tasks.iter().map(|t| t.items).collect();
        assert_eq!(items, [300, 7, 300, 60]);
        assert_eq!(
            tasks[0].question_types.as_deref(),
            Some(
                data.join("annotations/vqav2_test_annotations.json")
                    .as_path()
            )
        );
        assert_eq!(tasks[1].question_types, None);
        assert_eq!(tasks[2].images, data.join("gqa_images"));
        assert_eq!(tasks[3].images, data.join("images"));
    }

    #[test]
    fn a_bad_task_is_a_one_line_error_naming_its_key() {
        let cases: [(&[&str], &str, &str); 5] = [
            // The OK-VQA file is missing.
            (
                &[
                    "annotations/vqav2_test.json",
                    "annotations/vqav2_test_annotations.json",
                    "annotations/gqa_testdev.json",
                    "annotations/nocaps_val_eval.json",
                    "gqa_images/.keep",
                ],
                FOUR_TASKS,
                "eval.tasks[1].file: ",
            ),
            (
                &["annotations/a.json"],
                "[[eval.tasks]]\nname = \"A\"\nkind = \"retrieval\"\nfile = \"annotations/a.json\"\n",
                "kind = \"retrieval\"   |        ^^^^^^^^^^^ unknown variant `retrieval`, expected `vqa` or `caption`",
            ),
            (
                &["annotations/a.json"],
                "[[eval.tasks]]\nname = \"A\"\nkind = \"vqa\"\nfile = \"annotations/a.json\"\n\
                 [[eval.tasks]]\nname = \"A\"\nkind = \"caption\"\nfile = \"annotations/a.json\"\n",
                "eval.tasks[1].name: \"A\" is also the name of eval.tasks[0]",
            ),
            (
                &["annotations/a.json"],
                "[[eval.tasks]]\nname = \"A\"\nkind = \"vqa\"\nfile = \"annotations/a.json\"\n\
                 question_types = \"annotations/missing.json\"\n",
                "eval.tasks[0].question_types: ",
            ),
            (
                &["annotations/a.json"],
                "[[eval.tasks]]\nname = \"A\"\nkind = \"vqa\"\nfile = \"annotations/a.json\"\n\
                 images = \"nowhere\"\n",
                "eval.tasks[0].images: ",
            ),
        ];
        for (files, tail, expected) in cases {
            let (_tmp, cfg) = with_data(files, tail);
            let msg = cfg.unwrap_err().to_string();
            assert!(msg.contains(expected), "{msg:?} lacks {expected:?}");
            assert!(msg.contains("study.toml: "), "{msg}");
            assert!(!msg.contains('\n'), "{msg:?}");
        }
    }

    #[test]
    fn the_default_tasks_are_the_test_split() {
        let eval = Eval::default();
        let tasks = eval.resolved_tasks(Path::new("d")).unwrap();
        assert_eq!(tasks.len(), 2);
        assert_eq!(tasks[0].file, Path::new("d/annotations/vqa_test.json"));
        assert_eq!(
            tasks[1].file,
            Path::new("d/annotations/caption_test_eval.json")
        );
        let no_captions = Eval {
            caption_items: 0,
            ..Eval::default()
        };
        assert_eq!(no_captions.resolved_tasks(Path::new("d")).unwrap().len(), 1);
    }

    #[test]
    fn allocations_are_checked_at_load() {
        let grid = |alloc: &str, settings: &str| {
            format!(
                "[grid]\nmethods = [\"wanda\"]\nsettings = {settings}\nallocations = {alloc}\n\
                 [eval]\ncaption_items = 0\n"
            )
        };
        let files = ["annotations/vqa_test.json"];
        let (_t, ok) = with_data(
            &files,
            &grid("[\"uniform\", \"owl\"]", "[\"50%\", \"2:4\"]"),
        );
        let ok = ok.unwrap();
        assert_eq!(
            ok.grid[0].allocations,
            [AllocationKind::Uniform, AllocationKind::Owl]
        );
        assert_eq!((ok.grid[0].owl_m, ok.grid[0].owl_lambda), (5.0, 0.08));
        for (g, expected) in [
            (
                grid("[\"owl\"]", "[\"2:4\", \"4:8\"]"),
                "grid.allocations: \"owl\" applies to unstructured settings",
            ),
            (
                grid("[\"owl\", \"lamp\"]", "[\"50%\"]"),
                "unknown variant `lamp`, expected `uniform` or `owl`",
            ),
            (grid("[]", "[\"50%\"]"), "grid.allocations: is empty"),
            (
                format!(
                    "{}[[grid]]\nmethods = [\"wanda\"]\nsettings = [\"50%\"]\nowl_m = 0\n",
                    ""
                ) + "[[grid]]\nmethods = [\"wanda\"]\nsettings = [\"50%\"]\n",
                "grid[0].owl_m: 0 must be > 0",
            ),
        ] {
            let (_t, cfg) = with_data(&files, &g);
            let msg = cfg.unwrap_err().to_string();
            assert!(msg.contains(expected), "{msg:?} lacks {expected:?}");
            assert!(!msg.contains('\n'), "{msg:?}");
        }
    }

    const VQA_TEST: [&str; 1] = ["annotations/vqa_test.json"];

    #[test]
    fn device_counts_pass_through_and_are_checked() {
        let (_tmp, cfg) = with_data(
            &VQA_TEST,
            "[ressa]\nbatch_size = 8\ndevices = 4\n[eval]\ncaption_items = 0\ndevices = 2\n",
        );
        let cfg = cfg.unwrap();
        assert_eq!(cfg.ressa.unwrap().devices, 4);
        assert_eq!(cfg.eval.devices, 2);
        for (tail, needle) in [
            ("[eval]\ncaption_items = 0\ndevices = 0\n", "eval.devices"),
            (
                "[ressa]\nbatch_size = 8\ndevices = 3\n[eval]\ncaption_items = 0\n",
                "ressa.batch_size 8 is not divisible by devices 3",
            ),
            (
                "[ressa]\ndevices = 0\n[eval]\ncaption_items = 0\n",
                "ressa.devices",
            ),
        ] {
            let err = with_data(&VQA_TEST, tail).1.unwrap_err().to_string();
            assert!(
                err.contains(needle) && err.lines().count() == 1,
                "{tail}: {err}"
            );
        }
    }

    #[test]
    fn init_std_is_read_from_the_model_table() {
        let (_tmp, cfg) = scratch_edited(|base, _| {
            format!(
                "{base}\n[model.init_std]\n\"vision_model.embeddings.position_embedding\" = 5.0\n"
            )
        });
        let cfg = cfg.unwrap();
        assert_eq!(
            cfg.model
                .init_std
                .get("vision_model.embeddings.position_embedding"),
            Some(&5.0)
        );
        let plain = ExperimentConfig::from_file(&configs("shapes-paper-scratch.toml")).unwrap();
        assert!(plain.model.init_std.is_empty());
    }

    #[test]
    fn a_warm_up_that_cannot_run_is_refused_when_the_study_is_read() {
        let (_tmp, cfg) = scratch_edited(|base, _| {
            assert!(base.contains("warm_steps = 500\n"));
            base.replacen("warm_steps = 500\n", "warm_steps = 9500\n", 1)
        });
        let e = cfg.unwrap_err().to_string();
        assert!(
            e.contains("s.toml")
                && e.contains("`warm_steps` is 9500, expected fewer than `steps` (9000)"),
            "{e}"
        );
    }

    #[test]
    fn vision_pretraining_on_data_without_scenes_is_refused_when_the_study_is_read() {
        let (_tmp, cfg) = scratch_edited(|base, dir| {
            let data = dir.join("data");
            std::fs::create_dir_all(data.join("annotations")).unwrap();
            let start = base.find("[data.shapes]").unwrap();
            let end = base.find("[calibration]").unwrap();
            format!(
                "{}[data]\ndir = {:?}\n\n{}",
                &base[..start],
                data.display().to_string(),
                &base[end..]
            )
        });
        let e = cfg.unwrap_err().to_string();
        assert!(
            e.contains("model.pretrain.vision_steps: ")
                && e.contains("scenes_train.json is missing")
                && e.lines().count() == 1,
            "{e}"
        );
    }

    #[test]
    fn the_repository_configs_load() {
        let tiny = ExperimentConfig::from_file(&configs("shapes-tiny.toml")).unwrap();
        assert_eq!(tiny.grid.len(), 2);
        assert_eq!(tiny.grid[0].allocations, [AllocationKind::Uniform]);
        assert_eq!(tiny.grid[1].allocations, [AllocationKind::Owl]);
        assert!(tiny.eval.tasks.is_empty());
        let ci = ExperimentConfig::from_file(&configs("shapes-ci.toml")).unwrap();
        assert_eq!(ci.eval.tasks.len(), 3);
        // The real study's data is not in the repository: its first task's file is missing.
        let msg = ExperimentConfig::from_file(&configs("instructblip-flan-t5-xl.toml"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("eval.tasks[0].file: "), "{msg}");
        // Every shapes study loads, and its model config trains on its images.
        for entry in std::fs::read_dir(configs("")).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if !(name.starts_with("shapes-") && name.ends_with(".toml")) {
                continue;
            }
            let cfg = ExperimentConfig::from_file(&path).unwrap();
            let model_config = match (&cfg.model.train_config, &cfg.model.dir) {
                (Some(c), _) => c.clone(),
                (None, Some(dir)) => dir.join("config.json"),
                (None, None) => panic!("{name}: no model"),
            };
            let model: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(configs("").join("..").join(model_config)).unwrap(),
            )
            .unwrap();
            let shapes = cfg.data.shapes.unwrap();
            let size = shapes.model_image_size.unwrap_or(shapes.image_size);
            assert_eq!(
                model["vision_config"]["image_size"].as_u64(),
                Some(u64::from(size)),
                "{name}"
            );
        }
    }
}
