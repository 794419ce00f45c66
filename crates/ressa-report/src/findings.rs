//! The paper's three findings, judged from a study's numbers:
//!
//! - (a) [`split`]: at a fixed total `s_v + s_l`, equal sparsity in both towers is near the best split;
//! - (b) [`language_only`]: pruning only the language model hurts less than pruning both;
//! - (c) [`recovery`]: RESSA recovers a clear part of the pruning loss for every pruner.
//!
//! All comparisons use one primary metric ([`PrimaryMetric::choose`]). Cells without a value
//! for it are left out. Each finding says [`Verdict::NotEnoughData`] rather than guess.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::results::{Cell, Group, Metrics, Results, Setting, Variant, percent, sparsity_key};

/// (a): the equal split holds if it is within `max(SPLIT_TOLERANCE_ABS, SPLIT_TOLERANCE_REL × range)`
/// of the best split, range = best − worst score of the sweep. 0.02 = 2 accuracy points.
pub const SPLIT_TOLERANCE_ABS: f64 = 0.02;
/// (a): relative part of the tolerance, 5 % of the sweep's range.
pub const SPLIT_TOLERANCE_REL: f64 = 0.05;
/// (c): a "clear part" of the loss: RESSA recovers at least 25 % of `dense − pruned`.
pub const RECOVERY_CLEAR: f64 = 0.25;
/// (c): below this loss (1 point) the recovered fraction is noise and is not judged.
pub const RECOVERY_MIN_LOSS: f64 = 0.01;

/// The outcome of a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The numbers agree with the paper.
    Holds,
    /// The numbers contradict the paper.
    DoesNotHold,
    /// The study lacks the cells to decide.
    NotEnoughData,
}

impl Verdict {
    /// `holds`, `does not hold`, `not enough data`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Holds => "holds",
            Verdict::DoesNotHold => "does not hold",
            Verdict::NotEnoughData => "not enough data",
        }
    }

    /// Overall verdict from per-item verdicts: holds if every judged item holds.
    fn all(items: impl IntoIterator<Item = Verdict>) -> Verdict {
        let mut any = false;
        for v in items {
            match v {
                Verdict::DoesNotHold => return Verdict::DoesNotHold,
                Verdict::Holds => any = true,
                Verdict::NotEnoughData => {}
            }
        }
        if any {
            Verdict::Holds
        } else {
            Verdict::NotEnoughData
        }
    }
}

/// The metric the findings compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrimaryMetric {
    /// VQA accuracy (fraction; shown in %).
    VqaAccuracy,
    /// Raw CIDEr-D (shown ×100).
    Cider,
}

impl PrimaryMetric {
    /// VQA accuracy if any model of the study has it, else CIDEr if any has it.
    pub fn choose(results: &Results) -> Option<PrimaryMetric> {
        let all = || {
            std::iter::once(&results.dense).chain(results.cells.iter().flat_map(|c| {
                std::iter::once(&c.pruned).chain(c.ressa.as_ref().map(|r| &r.metrics))
            }))
        };
        if all().any(|m| m.vqa_accuracy.is_some()) {
            Some(PrimaryMetric::VqaAccuracy)
        } else if all().any(|m| m.cider.is_some()) {
            Some(PrimaryMetric::Cider)
        } else {
            None
        }
    }

    /// The metric's value, if measured and finite.
    pub fn of(self, m: &Metrics) -> Option<f64> {
        let v = match self {
            PrimaryMetric::VqaAccuracy => m.vqa_accuracy,
            PrimaryMetric::Cider => m.cider,
        };
        v.filter(|x| x.is_finite())
    }

    /// Column heading.
    pub fn label(self) -> &'static str {
        match self {
            PrimaryMetric::VqaAccuracy => "VQA accuracy (%)",
            PrimaryMetric::Cider => "CIDEr (×100)",
        }
    }

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            PrimaryMetric::VqaAccuracy => "VQA accuracy",
            PrimaryMetric::Cider => "CIDEr",
        }
    }
}

/// A score as shown: ×100, one decimal.
pub fn points(x: f64) -> String {
    format!("{:.1}", x * 100.0)
}

/// A signed difference in points, one decimal.
fn signed_points(x: f64) -> String {
    format!("{:+.1}", x * 100.0)
}

/// All three findings.
#[derive(Debug, Clone)]
pub struct Findings {
    /// The metric compared (`None`: the study has neither VQA accuracy nor CIDEr).
    pub metric: Option<PrimaryMetric>,
    /// (a)
    pub split: SplitFinding,
    /// (b)
    pub language_only: TowerFinding,
    /// (c)
    pub recovery: RecoveryFinding,
}

impl Findings {
    /// Evaluates all three findings.
    pub fn evaluate(results: &Results) -> Findings {
        let metric = PrimaryMetric::choose(results);
        Findings {
            metric,
            split: split(results, metric),
            language_only: language_only(results, metric),
            recovery: recovery(results, metric),
        }
    }
}

/// One point of a split sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitPoint {
    /// Vision sparsity.
    pub vision: f64,
    /// Language sparsity.
    pub language: f64,
    /// Primary-metric score.
    pub score: f64,
    /// The cell it comes from.
    pub cell_id: String,
}

impl SplitPoint {
    /// `50:50`.
    pub fn label(&self) -> String {
        let p = |x: f64| percent(x).trim_end_matches('%').to_string();
        format!("{}:{}", p(self.vision), p(self.language))
    }
}

/// A vision/language sweep at one fixed sum.
#[derive(Debug, Clone)]
pub struct SplitSweep {
    /// Method, allocation, Q-Former sparsity.
    pub variant: Variant,
    /// Pattern string.
    pub pattern: String,
    /// `vision + language`.
    pub sum: f64,
    /// Points by increasing vision sparsity.
    pub points: Vec<SplitPoint>,
    /// Index of the best point.
    pub best: usize,
    /// Index of the equal split, if measured.
    pub equal: Option<usize>,
    /// The equal split came from a grid cell (no split cell had it).
    pub equal_from_grid: bool,
    /// best − equal, when the equal split was measured.
    pub gap: Option<f64>,
    /// The tolerance applied.
    pub tolerance: f64,
    /// This sweep's verdict.
    pub verdict: Verdict,
}

/// Finding (a).
#[derive(Debug, Clone)]
pub struct SplitFinding {
    /// Holds if the equal split is within tolerance of the best in every judged sweep.
    pub verdict: Verdict,
    /// Every sweep found.
    pub sweeps: Vec<SplitSweep>,
    /// The paragraph for the report.
    pub markdown: String,
}

/// (a) Sweeps are split cells sharing method, allocation, Q-Former sparsity, pattern and
/// `vision + language`; a grid cell (equal towers) with the same sum stands in for a missing
/// equal split. A sweep is judged when it has the equal split and at least one other point:
/// it holds if `best − equal ≤ max(2 points, 5 % of best − worst)`. The finding holds if
/// every judged sweep holds.
pub fn split(results: &Results, metric: Option<PrimaryMetric>) -> SplitFinding {
    let mut out = String::new();
    let Some(metric) = metric else {
        return no_metric_split();
    };
    let _ = write!(
        out,
        "Criterion: in each sweep at a fixed sum s_v + s_l, the equal split is within \
         max({} points, {:.0} % of the sweep's best − worst) of the best split ({}). ",
        points(SPLIT_TOLERANCE_ABS),
        SPLIT_TOLERANCE_REL * 100.0,
        metric.name()
    );

    type Key = (Variant, String, i64);
    let mut sweeps: BTreeMap<Key, Vec<(SplitPoint, bool)>> = BTreeMap::new();
    for c in results.cells.iter().filter(|c| c.group == Group::Split) {
        if let Some(score) = metric.of(&c.pruned) {
            let key = (
                Variant::of(c),
                c.pattern.clone(),
                sparsity_key(c.vision + c.language),
            );
            sweeps
                .entry(key)
                .or_default()
                .push((point(c, score), false));
        }
    }
    // Grid cells fill in a missing equal split.
    for c in results.cells.iter().filter(|c| c.group == Group::Grid) {
        let key = (
            Variant::of(c),
            c.pattern.clone(),
            sparsity_key(c.vision + c.language),
        );
        if let (Some(pts), Some(score)) = (sweeps.get_mut(&key), metric.of(&c.pruned)) {
            let vk = sparsity_key(c.vision);
            if !pts.iter().any(|(p, _)| sparsity_key(p.vision) == vk) {
                pts.push((point(c, score), true));
            }
        }
    }

    let mut list = Vec::new();
    for ((variant, pattern, sum), mut pts) in sweeps {
        pts.sort_by(|a, b| a.0.vision.total_cmp(&b.0.vision));
        // One point per split: the first cell wins.
        pts.dedup_by(|b, a| sparsity_key(a.0.vision) == sparsity_key(b.0.vision));
        let equal = pts
            .iter()
            .position(|(p, _)| sparsity_key(p.vision) == sparsity_key(p.language));
        let equal_from_grid = equal.is_some_and(|i| pts[i].1);
        let points: Vec<SplitPoint> = pts.into_iter().map(|(p, _)| p).collect();
        let best = (0..points.len())
            .max_by(|&a, &b| points[a].score.total_cmp(&points[b].score))
            .unwrap_or(0);
        let worst = points.iter().map(|p| p.score).fold(f64::INFINITY, f64::min);
        let range = points[best].score - worst;
        let tolerance = SPLIT_TOLERANCE_ABS.max(SPLIT_TOLERANCE_REL * range);
        let gap = equal.map(|e| points[best].score - points[e].score);
        let verdict = match gap {
            Some(g) if points.len() >= 2 => {
                if g <= tolerance + 1e-12 {
                    Verdict::Holds
                } else {
                    Verdict::DoesNotHold
                }
            }
            _ => Verdict::NotEnoughData,
        };
        list.push(SplitSweep {
            variant,
            pattern,
            sum: sum as f64 / 10_000.0,
            points,
            best,
            equal,
            equal_from_grid,
            gap,
            tolerance,
            verdict,
        });
    }
    list.sort_by(|a, b| {
        (a.variant.sort_key(), &a.pattern, sparsity_key(a.sum)).cmp(&(
            b.variant.sort_key(),
            &b.pattern,
            sparsity_key(b.sum),
        ))
    });

    let verdict = Verdict::all(list.iter().map(|s| s.verdict));
    if list.is_empty() {
        out.push_str("The study has no split cells with this metric.");
    } else {
        end_paragraph(&mut out);
        for s in &list {
            let best = &s.points[s.best];
            let _ = write!(
                out,
                "\n- {}, {}, s_v + s_l = {}: best split {} ({})",
                s.variant.label(),
                s.pattern,
                percent(s.sum),
                best.label(),
                points(best.score)
            );
            match (s.equal, s.gap) {
                (Some(e), Some(g)) => {
                    let eq = &s.points[e];
                    let _ = write!(
                        out,
                        "; equal split {} ({}{}), gap {} points, tolerance {} → {}",
                        eq.label(),
                        points(eq.score),
                        if s.equal_from_grid {
                            ", from the grid cell"
                        } else {
                            ""
                        },
                        points(g),
                        points(s.tolerance),
                        s.verdict.as_str()
                    );
                    if s.points.len() < 2 {
                        out.push_str(" (only one point)");
                    }
                }
                _ => out.push_str("; the equal split was not measured → not judged"),
            }
        }
        out.push_str(
            "\n\nThe paper (§11.2) finds 50:50 best at a sum of 100 % and 60:60 best at 120 %.",
        );
    }
    let _ = write!(out, "\n\n**Verdict: {}.**", verdict.as_str());
    SplitFinding {
        verdict,
        sweeps: list,
        markdown: out,
    }
}

/// Ends the criterion paragraph before the item list.
fn end_paragraph(out: &mut String) {
    out.truncate(out.trim_end().len());
    out.push('\n');
}

fn point(c: &Cell, score: f64) -> SplitPoint {
    SplitPoint {
        vision: c.vision,
        language: c.language,
        score,
        cell_id: c.id.clone(),
    }
}

fn no_metric_split() -> SplitFinding {
    SplitFinding {
        verdict: Verdict::NotEnoughData,
        sweeps: Vec::new(),
        markdown: no_metric_text(),
    }
}

fn no_metric_text() -> String {
    "The study has neither VQA accuracy nor CIDEr, so nothing can be compared.\n\n\
     **Verdict: not enough data.**"
        .to_string()
}

/// One language-only vs V+L comparison.
#[derive(Debug, Clone)]
pub struct TowerPair {
    /// Method, allocation, Q-Former sparsity.
    pub variant: Variant,
    /// `50%`, `2:4`.
    pub setting: Setting,
    /// Language-only score.
    pub language_only: f64,
    /// V+L (grid) score at the same sparsity.
    pub both: f64,
    /// Vision-only score at the same sparsity, for context.
    pub vision_only: Option<f64>,
    /// The language-only cell.
    pub language_only_id: String,
    /// The grid cell.
    pub both_id: String,
}

impl TowerPair {
    /// Language-only scores at least as high as V+L.
    pub fn language_only_wins(&self) -> bool {
        self.language_only >= self.both
    }
}

/// Finding (b).
#[derive(Debug, Clone)]
pub struct TowerFinding {
    /// Holds if language-only ≥ V+L in a strict majority of the pairs.
    pub verdict: Verdict,
    /// Every pair found, sorted by variant and setting.
    pub pairs: Vec<TowerPair>,
    /// Pairs where language-only ≥ V+L.
    pub wins: usize,
    /// The paragraph for the report.
    pub markdown: String,
}

/// (b) Each language-only cell is paired with the grid cell of the same method, allocation,
/// Q-Former sparsity and pattern whose (equal) tower sparsity equals its language sparsity.
/// Holds if language-only ≥ V+L in more than half of the pairs; ties count for language-only.
pub fn language_only(results: &Results, metric: Option<PrimaryMetric>) -> TowerFinding {
    let Some(metric) = metric else {
        return TowerFinding {
            verdict: Verdict::NotEnoughData,
            pairs: Vec::new(),
            wins: 0,
            markdown: no_metric_text(),
        };
    };
    let find = |group: Group, like: &Cell| {
        results.cells.iter().find_map(|c| {
            let same = c.group == group
                && Variant::of(c) == Variant::of(like)
                && c.pattern == like.pattern
                && sparsity_key(c.tower_sparsity()) == sparsity_key(like.language);
            if same {
                metric.of(&c.pruned).map(|s| (s, c))
            } else {
                None
            }
        })
    };
    let mut pairs = Vec::new();
    for lo in results
        .cells
        .iter()
        .filter(|c| c.group == Group::LanguageOnly)
    {
        let (Some(score), Some(setting)) = (metric.of(&lo.pruned), lo.setting()) else {
            continue;
        };
        if let Some((both, grid)) = find(Group::Grid, lo) {
            pairs.push(TowerPair {
                variant: Variant::of(lo),
                setting,
                language_only: score,
                both,
                vision_only: find(Group::VisionOnly, lo).map(|(s, _)| s),
                language_only_id: lo.id.clone(),
                both_id: grid.id.clone(),
            });
        }
    }
    pairs.sort_by_key(|a| (a.variant.sort_key(), a.setting));
    let wins = pairs.iter().filter(|p| p.language_only_wins()).count();
    let verdict = if pairs.is_empty() {
        Verdict::NotEnoughData
    } else if 2 * wins > pairs.len() {
        Verdict::Holds
    } else {
        Verdict::DoesNotHold
    };

    let mut out = format!(
        "Criterion: language-only pruning scores at least as high as pruning both towers at the \
         same sparsity ({}) in more than half of the pairs (ties count for language-only). ",
        metric.name()
    );
    if pairs.is_empty() {
        out.push_str(
            "The study has no language-only cell with a matching grid cell (same method, \
             pattern and sparsity).",
        );
    } else {
        let _ = write!(
            out,
            "Language-only ≥ V+L in {wins} of {} pairs.",
            pairs.len()
        );
        end_paragraph(&mut out);
        for p in &pairs {
            let _ = write!(
                out,
                "\n- {}, {}: language-only {} vs V+L {} ({} points)",
                p.variant.label(),
                p.setting.label(),
                points(p.language_only),
                points(p.both),
                signed_points(p.language_only - p.both)
            );
            if let Some(v) = p.vision_only {
                let _ = write!(out, "; vision-only {}", points(v));
            }
        }
        out.push_str(
            "\n\nThe paper (§11.3) shows language-only ahead of V+L from 50 % on \
             (e.g. ≈31.3 vs ≈4.6 at 70 %), and equal up to 40 %.",
        );
    }
    let _ = write!(out, "\n\n**Verdict: {}.**", verdict.as_str());
    TowerFinding {
        verdict,
        pairs,
        wins,
        markdown: out,
    }
}

/// One grid cell's RESSA recovery.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// Method, allocation, Q-Former sparsity.
    pub variant: Variant,
    /// `50%`, `70%`, `2:4`, `4:8`.
    pub setting: Setting,
    /// The grid cell.
    pub cell_id: String,
    /// Dense score.
    pub dense: f64,
    /// Pruned score.
    pub pruned: f64,
    /// Pruned + RESSA score, if RESSA ran and measured the metric.
    pub ressa: Option<f64>,
    /// `(ressa − pruned) / (dense − pruned)`, when judged.
    pub fraction: Option<f64>,
    /// This cell's verdict.
    pub verdict: Verdict,
}

/// Finding (c).
#[derive(Debug, Clone)]
pub struct RecoveryFinding {
    /// Holds if every judged method × setting recovers ≥ 25 %.
    pub verdict: Verdict,
    /// One entry per grid cell at a judged setting.
    pub entries: Vec<Recovery>,
    /// The paragraph for the report.
    pub markdown: String,
}

/// The grid settings the paper repairs: 50 % and 70 % unstructured, 2:4, 4:8.
pub fn paper_settings() -> [Setting; 4] {
    [
        Setting::Unstructured(5_000),
        Setting::Unstructured(7_000),
        Setting::NM(4, 8),
        Setting::NM(2, 4),
    ]
}

/// RESSA's recovered fraction of the pruning loss, `(ressa − pruned) / (dense − pruned)`;
/// `None` when pruning lost less than [`RECOVERY_MIN_LOSS`].
pub fn recovered_fraction(dense: f64, pruned: f64, ressa: f64) -> Option<f64> {
    let loss = dense - pruned;
    (loss >= RECOVERY_MIN_LOSS).then(|| (ressa - pruned) / loss)
}

/// (c) For every grid cell at 50 %, 70 % unstructured, 2:4 or 4:8: recovered fraction
/// `(ressa − pruned) / (dense − pruned)`; clear if ≥ 25 %. Not judged: cells without RESSA, and
/// cells whose pruning lost under 1 point (the fraction is noise). Holds if every judged
/// cell is clear.
pub fn recovery(results: &Results, metric: Option<PrimaryMetric>) -> RecoveryFinding {
    let Some(metric) = metric else {
        return RecoveryFinding {
            verdict: Verdict::NotEnoughData,
            entries: Vec::new(),
            markdown: no_metric_text(),
        };
    };
    let mut out = format!(
        "Criterion: at each grid setting the paper repairs (50 %, 70 %, 2:4, 4:8), RESSA \
         recovers at least {:.0} % of the pruning loss, (RESSA − pruned) / (dense − pruned), \
         for every pruner ({}). Cells whose pruning lost under {} point are not judged. ",
        RECOVERY_CLEAR * 100.0,
        metric.name(),
        points(RECOVERY_MIN_LOSS)
    );
    let Some(dense) = metric.of(&results.dense) else {
        out.push_str(
            "The dense model has no score for this metric.\n\n**Verdict: not enough data.**",
        );
        return RecoveryFinding {
            verdict: Verdict::NotEnoughData,
            entries: Vec::new(),
            markdown: out,
        };
    };
    let settings = paper_settings();
    let mut entries = Vec::new();
    for c in results.cells.iter().filter(|c| c.group == Group::Grid) {
        let Some(setting) = c.setting().filter(|s| settings.contains(s)) else {
            continue;
        };
        let Some(pruned) = metric.of(&c.pruned) else {
            continue;
        };
        let ressa = c.ressa.as_ref().and_then(|r| metric.of(&r.metrics));
        let fraction = ressa.and_then(|r| recovered_fraction(dense, pruned, r));
        let verdict = match fraction {
            Some(f) if f >= RECOVERY_CLEAR => Verdict::Holds,
            Some(_) => Verdict::DoesNotHold,
            None => Verdict::NotEnoughData,
        };
        entries.push(Recovery {
            variant: Variant::of(c),
            setting,
            cell_id: c.id.clone(),
            dense,
            pruned,
            ressa,
            fraction,
            verdict,
        });
    }
    entries.sort_by_key(|a| (a.variant.sort_key(), a.setting));
    let verdict = Verdict::all(entries.iter().map(|e| e.verdict));

    if entries.is_empty() {
        out.push_str("The study has no grid cell at these settings.");
    } else {
        let judged = entries
            .iter()
            .filter(|e| e.verdict != Verdict::NotEnoughData)
            .count();
        let clear = entries
            .iter()
            .filter(|e| e.verdict == Verdict::Holds)
            .count();
        let _ = write!(
            out,
            "Dense {}; {clear} of {judged} judged cells recover clearly.",
            points(dense)
        );
        end_paragraph(&mut out);
        for e in &entries {
            let _ = write!(
                out,
                "\n- {}, {}: pruned {}",
                e.variant.label(),
                e.setting.label(),
                points(e.pruned)
            );
            match (e.ressa, e.fraction) {
                (None, _) => out.push_str(", no RESSA run → not judged"),
                (Some(r), None) => {
                    let _ = write!(
                        out,
                        ", RESSA {} (pruning lost {} points → not judged)",
                        points(r),
                        points(dense - e.pruned)
                    );
                }
                (Some(r), Some(f)) => {
                    let _ = write!(
                        out,
                        ", RESSA {}: recovered {:.0} % → {}",
                        points(r),
                        f * 100.0,
                        if f >= RECOVERY_CLEAR {
                            "clear"
                        } else {
                            "not clear"
                        }
                    );
                }
            }
        }
        out.push_str(
            "\n\nThe paper (§11.1, Wanda on FlanT5-XL) reports 65.9 → 68.9 at 50 %, \
             55.7 → 66.3 at 2:4 and 61.5 → 67.6 at 4:8 (average score).",
        );
    }
    let _ = write!(out, "\n\n**Verdict: {}.**", verdict.as_str());
    RecoveryFinding {
        verdict,
        entries,
        markdown: out,
    }
}
