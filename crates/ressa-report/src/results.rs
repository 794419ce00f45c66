//! The `results.json` schema (`ressa-experiment/1`) that `cargo xtask experiment` writes:
//! one [`Results`] per study, one [`Cell`] per pruned model.
//!
//! Conventions: sparsities are fractions **removed** in `[0, 1)`; VQA accuracy and BLEU-4 are
//! fractions in `[0, 1]`; CIDEr is the raw CIDEr-D value (≥ 0, usually below 2; the report
//! shows it ×100 as papers do). A metric the study did not measure is `null`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};

/// The value of [`Results::schema`] this crate reads and writes. Later additions (`tasks`,
/// `Metrics::tasks`, `Cell::owl`) are optional fields: files without them still read.
pub const SCHEMA: &str = "ressa-experiment/1";

/// A whole study: reference points, every cell, and stage timings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Results {
    /// Always [`SCHEMA`].
    pub schema: String,
    /// Study name (from the experiment config).
    pub name: String,
    /// When the study ran (RFC 3339 by convention; shown as is).
    pub created: String,
    /// The machine it ran on, in words.
    pub machine: String,
    /// The unpruned model.
    pub dense: Metrics,
    /// A chance-level floor (the toy study uses a blind model: the most frequent training answer
    /// to the same question; may be all `null`).
    pub chance: Metrics,
    /// Every pruned model of the study.
    pub cells: Vec<Cell>,
    /// Wall-clock seconds per stage (`"calibration"`, `"eval"`, ...).
    pub timings: BTreeMap<String, f64>,
    /// The evaluation tasks, in the config's order (empty in files written before tasks).
    /// Each [`Metrics::tasks`] is keyed by these names. The top-level VQA accuracy is the
    /// first VQA task's, CIDEr and BLEU-4 the first caption task's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<Task>,
}

/// One evaluation task of a study.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Task {
    /// Unique name (`VQAv2`, `NoCaps`, ...).
    pub name: String,
    /// `vqa` or `caption`.
    pub kind: String,
    /// The annotation file scored.
    pub file: String,
    /// Items scored (the first N of the file).
    pub items: usize,
}

/// Scores of one model on one task; `None` where the task does not measure it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskMetrics {
    /// VQA accuracy (VQA tasks) in `[0, 1]`.
    pub vqa_accuracy: Option<f64>,
    /// Raw CIDEr-D (caption tasks).
    pub cider: Option<f64>,
    /// BLEU-4 in `[0, 1]` (caption tasks).
    pub bleu4: Option<f64>,
    /// VQA accuracy per question type (`question_type` of the annotations), when known.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub by_question_type: BTreeMap<String, TypeScore>,
    /// VQA accuracy per answer type (`answer_type`: `yes/no`, `number`, `other`), when known.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub by_answer_type: BTreeMap<String, TypeScore>,
}

/// Accuracy over the questions of one type.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TypeScore {
    /// VQA accuracy in `[0, 1]`.
    pub accuracy: f64,
    /// Questions of this type scored.
    pub items: usize,
}

/// OWL hyper-parameters of a cell (`allocation = "owl"`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwlParams {
    /// Outlier threshold multiplier `M`.
    pub m: f64,
    /// Spread `λ`: block sparsities range over target ± λ.
    pub lambda: f64,
}

/// Scores of one model; `None` where not measured. The three headline numbers are the first
/// VQA task's accuracy and the first caption task's CIDEr-D and BLEU-4 (the findings use them);
/// `tasks` has every task's scores.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// VQA accuracy as a fraction in `[0, 1]`.
    pub vqa_accuracy: Option<f64>,
    /// Raw CIDEr-D (≥ 0).
    pub cider: Option<f64>,
    /// BLEU-4 in `[0, 1]`.
    pub bleu4: Option<f64>,
    /// Per task (keyed by [`Task::name`]); empty in files written before tasks.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tasks: BTreeMap<String, TaskMetrics>,
}

/// Which experiment of the paper a cell belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Group {
    /// Methods × sparsities × patterns, vision = language sparsity.
    Grid,
    /// A vision/language sweep at a fixed sum `vision + language`.
    Split,
    /// Only the language model pruned (`vision = 0`).
    LanguageOnly,
    /// Only the vision tower pruned (`language = 0`).
    VisionOnly,
}

impl Group {
    /// The name used in `results.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Group::Grid => "grid",
            Group::Split => "split",
            Group::LanguageOnly => "language-only",
            Group::VisionOnly => "vision-only",
        }
    }
}

/// One pruned model (and optionally its RESSA repair).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cell {
    /// Unique within the study.
    pub id: String,
    /// The experiment it belongs to.
    pub group: Group,
    /// `magnitude`, `wanda`, `sparsegpt` or `dsnot`.
    pub method: String,
    /// `unstructured` or `N:M` (`2:4`, `4:8`).
    pub pattern: String,
    /// Vision tower sparsity in `[0, 1)`.
    pub vision: f64,
    /// Language model sparsity in `[0, 1)`.
    pub language: f64,
    /// Q-Former sparsity in `[0, 1)` (0 in the paper).
    pub qformer: f64,
    /// `uniform` or `owl`.
    pub allocation: String,
    /// OWL's hyper-parameters, for `owl` cells.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owl: Option<OwlParams>,
    /// Scores after pruning.
    pub pruned: Metrics,
    /// The RESSA repair, when run.
    pub ressa: Option<Ressa>,
    /// Seconds spent pruning and evaluating this cell.
    pub seconds: f64,
}

/// A RESSA repair of a cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ressa {
    /// Scores after repair.
    pub metrics: Metrics,
    /// Training loss at the first step.
    pub loss_before: f64,
    /// Training loss at the last step.
    pub loss_after: f64,
    /// Optimizer steps.
    pub steps: u64,
    /// Seconds spent training and evaluating.
    pub seconds: f64,
}

/// A schema violation: the field (JSON path) and what is wrong, on one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    /// JSON path of the offending field, e.g. `cells[3].vision`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for ValidationError {}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ValidationError {
    ValidationError {
        field: field.into(),
        message: message.into().replace(['\n', '\r'], " "),
    }
}

/// A sparsity pattern, parsed from [`Cell::pattern`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// Any weights may be removed.
    Unstructured,
    /// `n` of every `m` consecutive input weights removed.
    NM {
        /// Removed per group.
        n: u32,
        /// Group size.
        m: u32,
    },
}

impl Pattern {
    /// `"unstructured"` or `"N:M"` with `0 < N < M`.
    pub fn parse(s: &str) -> Option<Pattern> {
        if s == "unstructured" {
            return Some(Pattern::Unstructured);
        }
        let (n, m) = s.split_once(':')?;
        let (n, m) = (n.parse::<u32>().ok()?, m.parse::<u32>().ok()?);
        (n > 0 && n < m).then_some(Pattern::NM { n, m })
    }
}

/// A grid setting as the paper labels it: `50%` (unstructured) or `2:4`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Setting {
    /// Unstructured at a sparsity, in units of 1e-4 (see [`sparsity_key`]).
    Unstructured(i64),
    /// An N:M pattern.
    NM(u32, u32),
}

impl Setting {
    /// The setting of a pruned tower with this pattern and sparsity.
    pub fn new(pattern: Pattern, sparsity: f64) -> Setting {
        match pattern {
            Pattern::Unstructured => Setting::Unstructured(sparsity_key(sparsity)),
            Pattern::NM { n, m } => Setting::NM(n, m),
        }
    }

    /// `50%`, `2:4`.
    pub fn label(self) -> String {
        match self {
            Setting::Unstructured(k) => percent(k as f64 / 10_000.0),
            Setting::NM(n, m) => format!("{n}:{m}"),
        }
    }

    fn rank(self) -> (u8, i64, i64) {
        match self {
            Setting::Unstructured(k) => (0, k, 0),
            // N:M after unstructured, by sparsity, then the looser (larger M) first: 4:8 before 2:4.
            Setting::NM(n, m) => (1, (n as i64 * 10_000) / m as i64, -(m as i64)),
        }
    }
}

impl Ord for Setting {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.rank().cmp(&other.rank())
    }
}

impl PartialOrd for Setting {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// A sparsity as an integer key (1e-4 resolution) so equal ratios compare equal.
pub fn sparsity_key(x: f64) -> i64 {
    (x * 10_000.0).round() as i64
}

/// `50%`, `12.5%`.
pub fn percent(x: f64) -> String {
    let v = x * 100.0;
    if (v - v.round()).abs() < 1e-6 {
        format!("{:.0}%", v)
    } else {
        format!("{:.1}%", v)
    }
}

/// Sort key of a [`Variant`]: method rank, method, non-uniform allocation, allocation, Q-Former.
pub type VariantOrder = (usize, String, bool, String, i64);

/// What besides method and pattern tells cells apart: OWL allocation, a pruned Q-Former.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Variant {
    /// Pruning method.
    pub method: String,
    /// Allocation (`uniform`, `owl`).
    pub allocation: String,
    /// Q-Former sparsity key ([`sparsity_key`]).
    pub qformer: i64,
}

impl Variant {
    /// The variant of a cell.
    pub fn of(cell: &Cell) -> Variant {
        Variant {
            method: cell.method.clone(),
            allocation: cell.allocation.clone(),
            qformer: sparsity_key(cell.qformer),
        }
    }

    /// `wanda`, `wanda, owl`, `wanda, Q-Former 30%`.
    pub fn label(&self) -> String {
        let mut s = self.method.clone();
        if self.allocation != "uniform" {
            s.push_str(", ");
            s.push_str(&self.allocation);
        }
        if self.qformer != 0 {
            s.push_str(&format!(
                ", Q-Former {}",
                percent(self.qformer as f64 / 10_000.0)
            ));
        }
        s
    }

    /// Sort key: the paper's method order, then the rest alphabetically; uniform first.
    pub fn sort_key(&self) -> VariantOrder {
        (
            method_rank(&self.method),
            self.method.clone(),
            self.allocation != "uniform",
            self.allocation.clone(),
            self.qformer,
        )
    }
}

/// The paper's method order; unknown methods after, alphabetically.
pub fn method_rank(method: &str) -> usize {
    ["magnitude", "wanda", "sparsegpt", "dsnot"]
        .iter()
        .position(|m| *m == method)
        .unwrap_or(4)
}

impl Cell {
    /// The parsed pattern (`None` if invalid; [`Results::validate`] rejects those).
    pub fn pattern(&self) -> Option<Pattern> {
        Pattern::parse(&self.pattern)
    }

    /// The sparsity that names this cell's setting: the pruned tower's, or the language
    /// model's for grid (equal towers) and split cells.
    pub fn tower_sparsity(&self) -> f64 {
        match self.group {
            Group::VisionOnly => self.vision,
            _ => self.language,
        }
    }

    /// The setting (`50%`, `2:4`) of a grid or tower-only cell.
    pub fn setting(&self) -> Option<Setting> {
        Some(Setting::new(self.pattern()?, self.tower_sparsity()))
    }
}

fn check_unit(field: &str, x: f64, closed: bool) -> Result<(), ValidationError> {
    let ok = x.is_finite() && x >= 0.0 && if closed { x <= 1.0 } else { x < 1.0 };
    if ok {
        Ok(())
    } else {
        let range = if closed { "[0, 1]" } else { "[0, 1)" };
        Err(invalid(field, format!("{x} is outside {range}")))
    }
}

fn check_nonneg(field: &str, x: f64) -> Result<(), ValidationError> {
    if x.is_finite() && x >= 0.0 {
        Ok(())
    } else {
        Err(invalid(field, format!("{x} is not a finite number ≥ 0")))
    }
}

fn check_name(field: &str, s: &str) -> Result<(), ValidationError> {
    if s.trim().is_empty() {
        Err(invalid(field, "is empty"))
    } else {
        Ok(())
    }
}

impl Metrics {
    /// Ranges: VQA accuracy and BLEU-4 in `[0, 1]`, CIDEr finite and ≥ 0.
    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        if let Some(x) = self.vqa_accuracy {
            check_unit(&format!("{field}.vqa_accuracy"), x, true)?;
        }
        if let Some(x) = self.cider {
            check_nonneg(&format!("{field}.cider"), x)?;
        }
        if let Some(x) = self.bleu4 {
            check_unit(&format!("{field}.bleu4"), x, true)?;
        }
        for (name, t) in &self.tasks {
            let f = format!("{field}.tasks.{name}");
            if let Some(x) = t.vqa_accuracy {
                check_unit(&format!("{f}.vqa_accuracy"), x, true)?;
            }
            if let Some(x) = t.cider {
                check_nonneg(&format!("{f}.cider"), x)?;
            }
            if let Some(x) = t.bleu4 {
                check_unit(&format!("{f}.bleu4"), x, true)?;
            }
            for (by, map) in [
                ("by_question_type", &t.by_question_type),
                ("by_answer_type", &t.by_answer_type),
            ] {
                for (ty, score) in map {
                    check_unit(&format!("{f}.{by}.{ty}.accuracy"), score.accuracy, true)?;
                    if score.items == 0 {
                        return Err(invalid(format!("{f}.{by}.{ty}.items"), "is 0"));
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks that every task key names one of `tasks` (when the study lists tasks).
    fn check_task_names(&self, field: &str, tasks: &[Task]) -> Result<(), ValidationError> {
        if tasks.is_empty() {
            return Ok(());
        }
        for name in self.tasks.keys() {
            if !tasks.iter().any(|t| &t.name == name) {
                return Err(invalid(
                    format!("{field}.tasks"),
                    format!("{name:?} is not one of the study's tasks"),
                ));
            }
        }
        Ok(())
    }
}

/// The task kinds a study may list.
pub const TASK_KINDS: [&str; 2] = ["vqa", "caption"];

impl Results {
    /// The first VQA task (the one the findings use), if the study lists tasks.
    pub fn first_vqa_task(&self) -> Option<&Task> {
        self.tasks.iter().find(|t| t.kind == "vqa")
    }

    /// Every model's metrics with its JSON path: dense, chance, each cell pruned and repaired.
    fn all_metrics(&self) -> Vec<(String, &Metrics)> {
        let mut out = vec![
            ("dense".to_string(), &self.dense),
            ("chance".to_string(), &self.chance),
        ];
        for (i, c) in self.cells.iter().enumerate() {
            out.push((format!("cells[{i}].pruned"), &c.pruned));
            if let Some(r) = &c.ressa {
                out.push((format!("cells[{i}].ressa.metrics"), &r.metrics));
            }
        }
        out
    }
}

impl Cell {
    fn validate(&self, field: &str) -> Result<(), ValidationError> {
        let f = |name: &str| format!("{field}.{name}");
        check_name(&f("id"), &self.id)?;
        check_name(&f("method"), &self.method)?;
        check_name(&f("allocation"), &self.allocation)?;
        if let Some(o) = &self.owl {
            if self.allocation != "owl" {
                return Err(invalid(
                    f("owl"),
                    format!("is set but allocation is {:?}", self.allocation),
                ));
            }
            if !(o.m.is_finite() && o.m > 0.0) {
                return Err(invalid(f("owl.m"), format!("{} is not > 0", o.m)));
            }
            check_unit(&f("owl.lambda"), o.lambda, false)?;
        }
        if self.pattern().is_none() {
            return Err(invalid(
                f("pattern"),
                format!(
                    "{:?} is neither \"unstructured\" nor N:M with 0 < N < M",
                    self.pattern
                ),
            ));
        }
        check_unit(&f("vision"), self.vision, false)?;
        check_unit(&f("language"), self.language, false)?;
        check_unit(&f("qformer"), self.qformer, false)?;
        let (v, l) = (sparsity_key(self.vision), sparsity_key(self.language));
        match self.group {
            Group::Grid if v != l => {
                return Err(invalid(
                    f("language"),
                    format!(
                        "grid cells prune both towers equally, but vision is {} and language {}",
                        self.vision, self.language
                    ),
                ));
            }
            Group::LanguageOnly if v != 0 || l == 0 => {
                return Err(invalid(
                    f("vision"),
                    "language-only cells need vision = 0 and language > 0",
                ));
            }
            Group::VisionOnly if l != 0 || v == 0 => {
                return Err(invalid(
                    f("language"),
                    "vision-only cells need language = 0 and vision > 0",
                ));
            }
            _ => {}
        }
        self.pruned.validate(&f("pruned"))?;
        check_nonneg(&f("seconds"), self.seconds)?;
        if let Some(r) = &self.ressa {
            r.metrics.validate(&f("ressa.metrics"))?;
            for (name, x) in [("loss_before", r.loss_before), ("loss_after", r.loss_after)] {
                if !x.is_finite() {
                    return Err(invalid(f(&format!("ressa.{name}")), "is not finite"));
                }
            }
            check_nonneg(&f("ressa.seconds"), r.seconds)?;
        }
        Ok(())
    }
}

impl Results {
    /// Checks the schema string, metric ranges, sparsities in `[0, 1)`, patterns, that each
    /// group's towers are pruned as the group says, a non-empty cell list with unique ids,
    /// and finite timings. The error names the field (`cells[3].vision: ...`).
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.schema != SCHEMA {
            return Err(invalid(
                "schema",
                format!("expected {SCHEMA:?}, found {:?}", self.schema),
            ));
        }
        check_name("name", &self.name)?;
        self.dense.validate("dense")?;
        self.chance.validate("chance")?;
        if self.cells.is_empty() {
            return Err(invalid("cells", "is empty"));
        }
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (i, cell) in self.cells.iter().enumerate() {
            cell.validate(&format!("cells[{i}]"))?;
            if let Some(j) = seen.insert(cell.id.as_str(), i) {
                return Err(invalid(
                    format!("cells[{i}].id"),
                    format!("{:?} is also the id of cells[{j}]", cell.id),
                ));
            }
        }
        for (k, &x) in &self.timings {
            check_nonneg(&format!("timings.{k}"), x)?;
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (i, t) in self.tasks.iter().enumerate() {
            check_name(&format!("tasks[{i}].name"), &t.name)?;
            if !TASK_KINDS.contains(&t.kind.as_str()) {
                return Err(invalid(
                    format!("tasks[{i}].kind"),
                    format!("{:?} is not one of {}", t.kind, TASK_KINDS.join(", ")),
                ));
            }
            if let Some(j) = names.insert(t.name.as_str(), i) {
                return Err(invalid(
                    format!("tasks[{i}].name"),
                    format!("{:?} is also the name of tasks[{j}]", t.name),
                ));
            }
        }
        for (field, m) in self.all_metrics() {
            m.check_task_names(&field, &self.tasks)?;
        }
        Ok(())
    }

    /// Parses JSON text (no validation; see [`Results::validate`]).
    pub fn from_json(text: &str) -> Result<Results, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Pretty JSON.
    pub fn to_json(&self) -> String {
        // Serializing these plain structs cannot fail (string keys, no custom impls).
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_parse() {
        assert_eq!(Pattern::parse("unstructured"), Some(Pattern::Unstructured));
        assert_eq!(Pattern::parse("2:4"), Some(Pattern::NM { n: 2, m: 4 }));
        for bad in ["", "4:4", "0:4", "a:b", "2:4:8", "Unstructured"] {
            assert_eq!(Pattern::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn settings_order_and_labels() {
        let mut s = [
            Setting::NM(2, 4),
            Setting::Unstructured(7000),
            Setting::NM(4, 8),
            Setting::Unstructured(5000),
        ];
        s.sort();
        let labels: Vec<String> = s.iter().map(|s| s.label()).collect();
        assert_eq!(labels, ["50%", "70%", "4:8", "2:4"]);
        assert_eq!(percent(0.125), "12.5%");
    }
}
