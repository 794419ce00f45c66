//! `report.md`: summary, findings, grid / split / tower tables, every cell, timings.

use std::fmt::Write as _;

use crate::findings::{Findings, PrimaryMetric, points, recovered_fraction};
use crate::plots::tower_rows;
use crate::results::{
    Cell, Group, Metrics, Pattern, Results, Setting, TaskMetrics, Variant, percent,
};

/// Relative links to the plots that were written.
pub(crate) struct Links<'a> {
    pub split: Option<&'a str>,
    pub towers: Option<&'a str>,
    pub ressa: Option<&'a str>,
}

/// Text safe inside a table cell or a heading: one line, pipes escaped.
fn esc(s: &str) -> String {
    s.replace(['\n', '\r'], " ").replace('|', "\\|")
}

fn opt(x: Option<f64>) -> String {
    x.map(points).unwrap_or_else(|| "—".to_string())
}

fn metrics_cells(m: &Metrics) -> String {
    format!(
        "{} | {} | {}",
        opt(m.vqa_accuracy),
        opt(m.cider),
        opt(m.bleu4)
    )
}

pub(crate) fn render(results: &Results, found: &Findings, links: &Links<'_>) -> String {
    let mut o = String::new();
    let count = |g: Group| results.cells.iter().filter(|c| c.group == g).count();
    let _ = writeln!(o, "# RESSA experiment report: {}\n", esc(&results.name));
    let _ = writeln!(o, "| | |\n|---|---|");
    let _ = writeln!(o, "| created | {} |", esc(&results.created));
    let _ = writeln!(o, "| machine | {} |", esc(&results.machine));
    let _ = writeln!(o, "| schema | `{}` |", esc(&results.schema));
    let _ = writeln!(
        o,
        "| cells | {} (grid {}, split {}, language-only {}, vision-only {}) |",
        results.cells.len(),
        count(Group::Grid),
        count(Group::Split),
        count(Group::LanguageOnly),
        count(Group::VisionOnly)
    );
    let _ = writeln!(
        o,
        "| primary metric | {} |\n",
        found
            .metric
            .map_or("none (no VQA accuracy or CIDEr)", |m| m.label())
    );
    o.push_str("Scores are ×100: VQA accuracy in %, CIDEr-D and BLEU-4 ×100.");
    if !results.tasks.is_empty() {
        let first = |kind: &str| {
            results
                .tasks
                .iter()
                .find(|t| t.kind == kind)
                .map_or("none".to_string(), |t| format!("`{}`", esc(&t.name)))
        };
        let _ = write!(
            o,
            " The headline VQA accuracy (and so the findings) is the first VQA task's, {}; \
             CIDEr-D and BLEU-4 are the first caption task's, {}. Every task's scores are in \
             \"Tasks\".",
            first("vqa"),
            first("caption")
        );
    }
    o.push_str("\n\n");

    o.push_str("## Reference models\n\n");
    o.push_str("| model | VQA accuracy | CIDEr | BLEU-4 |\n|---|---:|---:|---:|\n");
    let _ = writeln!(o, "| dense | {} |", metrics_cells(&results.dense));
    let _ = writeln!(o, "| chance | {} |\n", metrics_cells(&results.chance));

    findings_section(&mut o, found);

    if let Some(metric) = found.metric {
        grid_section(&mut o, results, metric, links.ressa);
        owl_section(&mut o, results, metric);
        split_section(&mut o, found, metric, links.split);
        towers_section(&mut o, results, metric, links.towers);
    }
    tasks_section(&mut o, results);
    question_types_section(&mut o, results);
    cells_section(&mut o, results);
    timings_section(&mut o, results);
    o
}

fn findings_section(o: &mut String, f: &Findings) {
    let items = [
        (
            "(a) Equal vision/language sparsity is near the best split",
            f.split.verdict,
            &f.split.markdown,
        ),
        (
            "(b) Pruning only the language model hurts less than pruning both",
            f.language_only.verdict,
            &f.language_only.markdown,
        ),
        (
            "(c) RESSA recovers a clear part of the pruning loss",
            f.recovery.verdict,
            &f.recovery.markdown,
        ),
    ];
    o.push_str("## Findings\n\n| finding | verdict |\n|---|---|\n");
    for (title, verdict, _) in &items {
        let _ = writeln!(o, "| {title} | **{}** |", verdict.as_str());
    }
    o.push('\n');
    for (title, _, text) in &items {
        let _ = writeln!(o, "### {title}\n\n{text}\n");
    }
}

fn grid_section(o: &mut String, results: &Results, metric: PrimaryMetric, plot: Option<&str>) {
    let mut cells: Vec<_> = results
        .cells
        .iter()
        .filter(|c| c.group == Group::Grid)
        .filter_map(|c| Some((Variant::of(c), c.setting()?, c)))
        .collect();
    if cells.is_empty() {
        return;
    }
    cells.sort_by_key(|a| (a.0.sort_key(), a.1));
    let dense = metric.of(&results.dense);
    let _ = writeln!(
        o,
        "## Grid: both towers pruned equally\n\n{}; recovered = (RESSA − pruned) / (dense − pruned), \
         shown when pruning lost at least 1 point.\n",
        metric.label()
    );
    o.push_str(
        "| method | setting | pruned | + RESSA | recovered | RESSA loss (first → last) | steps | cell |\n\
         |---|---|---:|---:|---:|---|---:|---|\n",
    );
    for (variant, setting, c) in cells {
        let pruned = metric.of(&c.pruned);
        let ressa = c.ressa.as_ref().and_then(|r| metric.of(&r.metrics));
        let recovered = match (dense, pruned, ressa) {
            (Some(d), Some(p), Some(r)) => recovered_fraction(d, p, r),
            _ => None,
        };
        let (loss, steps) = match &c.ressa {
            Some(r) => (
                format!("{:.4} → {:.4}", r.loss_before, r.loss_after),
                r.steps.to_string(),
            ),
            None => ("—".to_string(), "—".to_string()),
        };
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            esc(&variant.label()),
            setting.label(),
            opt(pruned),
            opt(ressa),
            recovered.map_or("—".to_string(), |f| format!("{:.0} %", f * 100.0)),
            loss,
            steps,
            esc(&c.id)
        );
    }
    o.push('\n');
    if let Some(p) = plot {
        let _ = writeln!(o, "![pruned vs pruned + RESSA]({p})\n");
    }
}

fn split_section(o: &mut String, f: &Findings, metric: PrimaryMetric, plot: Option<&str>) {
    if f.split.sweeps.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "## Sparsity allocation at a fixed sum\n\n{}; ★ best split, = equal split.\n",
        metric.label()
    );
    o.push_str(
        "| method | pattern | s_v + s_l | s_v:s_l | score | mark | cell |\n|---|---|---:|---|---:|---|---|\n",
    );
    for s in &f.split.sweeps {
        for (i, p) in s.points.iter().enumerate() {
            let mut mark = String::new();
            if i == s.best {
                mark.push('★');
            }
            if s.equal == Some(i) {
                mark.push('=');
            }
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} |",
                esc(&s.variant.label()),
                esc(&s.pattern),
                percent(s.sum),
                p.label(),
                points(p.score),
                mark,
                esc(&p.cell_id)
            );
        }
    }
    o.push('\n');
    if let Some(p) = plot {
        let _ = writeln!(o, "![score vs vision/language split]({p})\n");
    }
}

fn towers_section(o: &mut String, results: &Results, metric: PrimaryMetric, plot: Option<&str>) {
    let rows = tower_rows(results, metric);
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "## Which tower to prune\n\n{}; the setting is the pruned towers' sparsity.\n",
        metric.label()
    );
    o.push_str(
        "| method | setting | V+L | language only | vision only |\n|---|---|---:|---:|---:|\n",
    );
    for (variant, settings) in &rows {
        for (setting, s) in settings {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} |",
                esc(&variant.label()),
                setting.label(),
                opt(s[0]),
                opt(s[1]),
                opt(s[2])
            );
        }
    }
    o.push('\n');
    if let Some(p) = plot {
        let _ = writeln!(o, "![V+L vs language-only vs vision-only]({p})\n");
    }
}

fn cells_section(o: &mut String, results: &Results) {
    o.push_str(
        "## All cells\n\nSparsities removed per tower; scores ×100 (pruned, then after RESSA).\n\n",
    );
    o.push_str(
        "| id | group | method | pattern | vision | language | Q-Former | allocation \
         | VQA | CIDEr | BLEU-4 | RESSA VQA | RESSA CIDEr | RESSA BLEU-4 | seconds | RESSA seconds |\n\
         |---|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for c in &results.cells {
        let empty = Metrics::default();
        let r = c.ressa.as_ref().map_or(&empty, |r| &r.metrics);
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {} |",
            esc(&c.id),
            c.group.as_str(),
            esc(&c.method),
            esc(&c.pattern),
            percent(c.vision),
            percent(c.language),
            percent(c.qformer),
            esc(&c.allocation),
            metrics_cells(&c.pruned),
            metrics_cells(r),
            c.seconds,
            c.ressa
                .as_ref()
                .map_or("—".to_string(), |r| format!("{:.1}", r.seconds))
        );
    }
    o.push('\n');
}

fn timings_section(o: &mut String, results: &Results) {
    o.push_str("## Timings\n\n| stage | seconds |\n|---|---:|\n");
    for (k, v) in &results.timings {
        let _ = writeln!(o, "| {} | {:.1} |", esc(k), v);
    }
    let cells: f64 = results.cells.iter().map(|c| c.seconds).sum();
    let ressa: f64 = results
        .cells
        .iter()
        .filter_map(|c| c.ressa.as_ref())
        .map(|r| r.seconds)
        .sum();
    let _ = writeln!(o, "| all cells (prune + eval) | {cells:.1} |");
    let _ = writeln!(o, "| all RESSA runs | {ressa:.1} |");
}

/// The grid cell's label: `wanda 50%`, `wanda, owl 70%`.
fn cell_label(c: &Cell) -> String {
    let setting = c.setting().map_or_else(|| c.pattern.clone(), |s| s.label());
    let variant = Variant::of(c).label();
    match c.group {
        Group::Grid => format!("{variant} {setting}"),
        Group::Split => format!(
            "{variant} split V {} / L {}",
            percent(c.vision),
            percent(c.language)
        ),
        Group::LanguageOnly => format!("{variant} language-only {setting}"),
        Group::VisionOnly => format!("{variant} vision-only {setting}"),
    }
}

/// OWL vs uniform allocation, for each grid cell that has both (same method, setting,
/// Q-Former sparsity).
fn owl_section(o: &mut String, results: &Results, metric: PrimaryMetric) {
    let grid: Vec<&Cell> = results
        .cells
        .iter()
        .filter(|c| c.group == Group::Grid)
        .collect();
    let mut pairs: Vec<(&Cell, &Cell)> = grid
        .iter()
        .filter(|c| c.allocation != "uniform")
        .filter_map(|owl| {
            let uniform = grid.iter().find(|u| {
                u.allocation == "uniform"
                    && u.method == owl.method
                    && u.pattern == owl.pattern
                    && u.qformer == owl.qformer
                    && u.setting() == owl.setting()
            })?;
            Some((*uniform, *owl))
        })
        .collect();
    if pairs.is_empty() {
        return;
    }
    pairs.sort_by_key(|(u, owl)| (Variant::of(owl).sort_key(), u.setting()));
    let params: Vec<String> = pairs
        .iter()
        .filter_map(|(_, c)| c.owl)
        .map(|p| format!("M = {}, λ = {}", p.m, p.lambda))
        .fold(Vec::new(), |mut v, s| {
            if !v.contains(&s) {
                v.push(s);
            }
            v
        });
    let _ = writeln!(
        o,
        "## Allocation: OWL vs uniform\n\n{}; grid cells pruned with OWL's per-block sparsities \
         (mean = the tower's target{}) next to the same method and setting with every matrix at \
         the target. OWL runs at unstructured settings only: an N:M pattern fixes every \
         matrix's sparsity, so grids that list `owl` run their N:M settings uniform only.\n",
        metric.label(),
        if params.is_empty() {
            String::new()
        } else {
            format!("; {}", params.join("; "))
        }
    );
    o.push_str(
        "| method | setting | allocation | pruned | + RESSA | OWL − uniform (pruned) | OWL − uniform (+ RESSA) |\n\
         |---|---|---|---:|---:|---:|---:|\n",
    );
    for (u, owl) in pairs {
        let score = |c: &Cell| metric.of(&c.pruned);
        let ressa = |c: &Cell| c.ressa.as_ref().and_then(|r| metric.of(&r.metrics));
        let diff = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => format!("{:+.1}", (a - b) * 100.0),
            _ => "—".to_string(),
        };
        let setting = u.setting().map_or_else(|| u.pattern.clone(), |s| s.label());
        for (c, d_pruned, d_ressa) in [
            (u, String::new(), String::new()),
            (owl, diff(score(owl), score(u)), diff(ressa(owl), ressa(u))),
        ] {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} |",
                esc(&c.method),
                setting,
                esc(&c.allocation),
                opt(score(c)),
                opt(ressa(c)),
                d_pruned,
                d_ressa
            );
        }
    }
    o.push('\n');
}

/// The main score of a task: VQA accuracy, else CIDEr-D.
fn task_score(t: &TaskMetrics) -> Option<f64> {
    t.vqa_accuracy.or(t.cider)
}

/// One column per task: dense, chance, every cell pruned and repaired.
fn tasks_section(o: &mut String, results: &Results) {
    if results.tasks.is_empty() {
        return;
    }
    o.push_str(
        "## Tasks\n\nEach task scored separately: VQA accuracy (GQA-style single answers by exact \
         match) for VQA tasks, CIDEr-D for caption tasks; \"a → b\" is pruned → + RESSA.\n\n",
    );
    o.push_str("| model |");
    for t in &results.tasks {
        let what = if t.kind == "vqa" { "VQA" } else { "CIDEr" };
        let _ = write!(o, " {} ({what}, {} items) |", esc(&t.name), t.items);
    }
    o.push_str("\n|---|");
    for _ in &results.tasks {
        o.push_str("---:|");
    }
    o.push('\n');
    let row = |o: &mut String, label: &str, a: &Metrics, b: Option<&Metrics>| {
        let _ = write!(o, "| {} |", esc(label));
        for t in &results.tasks {
            let x = a.tasks.get(&t.name).and_then(task_score);
            match b {
                None => {
                    let _ = write!(o, " {} |", opt(x));
                }
                Some(b) => {
                    let y = b.tasks.get(&t.name).and_then(task_score);
                    let _ = write!(o, " {} → {} |", opt(x), opt(y));
                }
            }
        }
        o.push('\n');
    };
    row(o, "dense", &results.dense, None);
    row(o, "chance", &results.chance, None);
    for c in &results.cells {
        row(
            o,
            &cell_label(c),
            &c.pruned,
            c.ressa.as_ref().map(|r| &r.metrics),
        );
    }
    o.push('\n');
}

/// Per question type: dense vs every grid cell at the study's highest unstructured sparsity
/// (70 % in the paper's grid), for each VQA task whose annotations carry question types.
fn question_types_section(o: &mut String, results: &Results) {
    let top = results
        .cells
        .iter()
        .filter(|c| c.group == Group::Grid && c.pattern() == Some(Pattern::Unstructured))
        .filter_map(|c| c.setting())
        .max();
    let Some(top) = top else {
        return;
    };
    let mut cells: Vec<&Cell> = results
        .cells
        .iter()
        .filter(|c| c.group == Group::Grid && c.setting() == Some(top))
        .collect();
    cells.sort_by_key(|c| Variant::of(c).sort_key());
    let mut header = false;
    for task in results.tasks.iter().filter(|t| t.kind == "vqa") {
        let Some(dense) = results.dense.tasks.get(&task.name) else {
            continue;
        };
        if dense.by_question_type.is_empty() {
            continue;
        }
        if !header {
            let _ = writeln!(
                o,
                "## Accuracy by question type\n\nVQA accuracy per `question_type` of the \
                 annotations: dense, chance (the blind floor of the reference models) and every \
                 grid cell at {} (the study's highest unstructured setting), pruned → + RESSA.\n",
                Setting::label(top)
            );
            header = true;
        }
        let _ = writeln!(o, "### {}\n", esc(&task.name));
        o.push_str("| question type | items | dense | chance |");
        for c in &cells {
            let _ = write!(o, " {} |", esc(&cell_label(c)));
        }
        o.push_str("\n|---|---:|---:|---:|");
        for _ in &cells {
            o.push_str("---:|");
        }
        o.push('\n');
        let kinds = [
            ("question", &dense.by_question_type),
            ("answer", &dense.by_answer_type),
        ];
        for (kind, types) in kinds {
            for (ty, score) in types {
                let label = if kind == "answer" {
                    format!("answer type: {ty}")
                } else {
                    ty.clone()
                };
                let get = |m: &Metrics| {
                    let t = m.tasks.get(&task.name)?;
                    let map = if kind == "answer" {
                        &t.by_answer_type
                    } else {
                        &t.by_question_type
                    };
                    map.get(ty).map(|s| s.accuracy)
                };
                let _ = write!(
                    o,
                    "| {} | {} | {} | {} |",
                    esc(&label),
                    score.items,
                    points(score.accuracy),
                    opt(get(&results.chance))
                );
                for c in &cells {
                    let p = get(&c.pruned);
                    match c.ressa.as_ref() {
                        Some(r) => {
                            let _ = write!(o, " {} → {} |", opt(p), opt(get(&r.metrics)));
                        }
                        None => {
                            let _ = write!(o, " {} |", opt(p));
                        }
                    }
                }
                o.push('\n');
            }
        }
        o.push('\n');
    }
}
