//! Findings on synthetic studies, the written report and plots, and the schema.

use std::collections::BTreeMap;

use ressa_report::findings::{RECOVERY_CLEAR, SPLIT_TOLERANCE_ABS};
use ressa_report::results::Setting;
use ressa_report::{
    Cell, Group, Metrics, PrimaryMetric, ReportError, Ressa, Results, SCHEMA, Verdict, findings,
    read_results, write_report,
};

fn vqa(x: f64) -> Metrics {
    Metrics {
        vqa_accuracy: Some(x),
        cider: None,
        bleu4: None,
        tasks: BTreeMap::new(),
    }
}

fn cell(id: &str, group: Group, method: &str, pattern: &str, v: f64, l: f64, score: f64) -> Cell {
    Cell {
        id: id.to_string(),
        group,
        method: method.to_string(),
        pattern: pattern.to_string(),
        vision: v,
        language: l,
        qformer: 0.0,
        allocation: "uniform".to_string(),
        owl: None,
        pruned: vqa(score),
        ressa: None,
        seconds: 12.5,
    }
}

const DENSE: f64 = 0.495;
const METHODS: [(&str, f64); 4] = [
    ("magnitude", -0.05),
    ("wanda", 0.0),
    ("sparsegpt", 0.005),
    ("dsnot", 0.003),
];
/// Grid settings with the paper's V+L scores (§11.3), as (pattern, sparsity, score).
const GRID: [(&str, f64, f64); 6] = [
    ("unstructured", 0.3, 0.49),
    ("unstructured", 0.5, 0.45),
    ("unstructured", 0.6, 0.287),
    ("unstructured", 0.7, 0.046),
    ("4:8", 0.5, 0.408),
    ("2:4", 0.5, 0.372),
];
/// Language-only and vision-only scores (§11.3) at the same settings.
const TOWERS: [(f64, f64); 6] = [
    (0.49, 0.49),
    (0.477, 0.468),
    (0.42, 0.423),
    (0.313, 0.168),
    (0.452, 0.459),
    (0.441, 0.441),
];

/// A study shaped like the paper's figures, where all three findings hold.
fn paper_like() -> Results {
    let mut cells = Vec::new();
    for (m, off) in METHODS {
        for (i, &(pattern, s, score)) in GRID.iter().enumerate() {
            let pruned = (score + off).max(0.0);
            let mut c = cell(
                &format!("grid-{m}-{i}"),
                Group::Grid,
                m,
                pattern,
                s,
                s,
                pruned,
            );
            if i > 0 && i != 2 {
                // RESSA at 50 %, 70 %, 4:8, 2:4: recovers 60 % of the loss.
                c.ressa = Some(Ressa {
                    metrics: vqa(pruned + 0.6 * (DENSE - pruned)),
                    loss_before: 2.5,
                    loss_after: 1.25,
                    steps: 390,
                    seconds: 300.0,
                });
            }
            cells.push(c);
        }
    }
    // §11.2, s_v + s_l = 100 %: 10:90 ... 90:10.
    let sum100 = [0.0, 0.026, 0.165, 0.416, 0.45, 0.402, 0.307, 0.286, 0.283];
    for (i, score) in sum100.iter().enumerate() {
        let v = (i + 1) as f64 / 10.0;
        let id = format!("split100-{i}");
        cells.push(cell(
            &id,
            Group::Split,
            "wanda",
            "unstructured",
            v,
            1.0 - v,
            *score,
        ));
    }
    // s_v + s_l = 120 %, without 60:60: the grid cell at 60 % stands in.
    let sum120 = [
        (0.3, 0.0),
        (0.4, 0.034),
        (0.5, 0.147),
        (0.7, 0.282),
        (0.8, 0.278),
        (0.9, 0.273),
    ];
    for (i, &(v, score)) in sum120.iter().enumerate() {
        let id = format!("split120-{i}");
        cells.push(cell(
            &id,
            Group::Split,
            "wanda",
            "unstructured",
            v,
            1.2 - v,
            score,
        ));
    }
    for m in ["wanda", "sparsegpt"] {
        for (i, (&(pattern, s, _), &(lo, vo))) in GRID.iter().zip(TOWERS.iter()).enumerate() {
            cells.push(cell(
                &format!("lo-{m}-{i}"),
                Group::LanguageOnly,
                m,
                pattern,
                0.0,
                s,
                lo,
            ));
            cells.push(cell(
                &format!("vo-{m}-{i}"),
                Group::VisionOnly,
                m,
                pattern,
                s,
                0.0,
                vo,
            ));
        }
    }
    Results {
        schema: SCHEMA.to_string(),
        name: "paper-like | synthetic".to_string(),
        created: "2025-01-01T00:00:00Z".to_string(),
        machine: "test machine".to_string(),
        dense: Metrics {
            vqa_accuracy: Some(DENSE),
            cider: Some(1.21),
            bleu4: Some(0.4),
            tasks: BTreeMap::new(),
        },
        chance: vqa(0.05),
        cells,
        timings: BTreeMap::from([
            ("calibration".to_string(), 10.0),
            ("eval".to_string(), 20.5),
        ]),
        tasks: Vec::new(),
    }
}

fn only(results: &Results, keep: impl Fn(&Cell) -> bool) -> Results {
    let mut r = results.clone();
    r.cells.retain(keep);
    r
}

#[test]
fn paper_like_numbers_hold() {
    let r = paper_like();
    r.validate().unwrap();
    let f = findings(&r);
    assert_eq!(f.metric, Some(PrimaryMetric::VqaAccuracy));

    assert_eq!(f.split.verdict, Verdict::Holds, "{}", f.split.markdown);
    assert_eq!(f.split.sweeps.len(), 2);
    let s100 = &f.split.sweeps[0];
    assert!((s100.sum - 1.0).abs() < 1e-9);
    assert_eq!(s100.points[s100.best].label(), "50:50");
    assert_eq!(s100.gap, Some(0.0));
    assert!(!s100.equal_from_grid);
    let s120 = &f.split.sweeps[1];
    assert!(s120.equal_from_grid);
    assert_eq!(s120.points[s120.best].label(), "60:60");
    assert!(f.split.markdown.contains("best split 50:50 (45.0)"));

    assert_eq!(f.language_only.verdict, Verdict::Holds);
    assert_eq!(f.language_only.pairs.len(), 12);
    // Ties count for language-only (wanda at 30 %); sparsegpt's V+L at 30 % (49.5) beats
    // language-only (49.0): 11 of 12.
    assert_eq!(f.language_only.wins, 11);
    assert!(f.language_only.markdown.contains("in 11 of 12 pairs"));
    let p70 = f
        .language_only
        .pairs
        .iter()
        .find(|p| p.variant.method == "wanda" && p.setting == Setting::Unstructured(7000))
        .unwrap();
    assert_eq!(
        (p70.language_only, p70.both, p70.vision_only),
        (0.313, 0.046, Some(0.168))
    );

    assert_eq!(
        f.recovery.verdict,
        Verdict::Holds,
        "{}",
        f.recovery.markdown
    );
    assert_eq!(f.recovery.entries.len(), 16);
    for e in &f.recovery.entries {
        assert!((e.fraction.unwrap() - 0.6).abs() < 1e-9, "{e:?}");
    }
    assert!(f.recovery.markdown.contains("recovered 60 % → clear"));
}

#[test]
fn language_only_worse_does_not_hold() {
    let mut r = paper_like();
    for c in r
        .cells
        .iter_mut()
        .filter(|c| c.group == Group::LanguageOnly)
    {
        // Language-only now 5 points behind V+L, except at 70 % where it stays ahead.
        let (pattern, s) = (c.pattern.clone(), c.language);
        let grid = GRID.iter().find(|g| g.0 == pattern && g.1 == s).unwrap().2;
        if s != 0.7 {
            c.pruned = vqa(grid - 0.05);
        }
    }
    let f = findings(&r);
    assert_eq!(f.language_only.verdict, Verdict::DoesNotHold);
    assert_eq!(f.language_only.wins, 2);
    assert_eq!(f.language_only.pairs.len(), 12);
    assert!(f.language_only.markdown.contains("in 2 of 12 pairs"));
    assert!(
        f.language_only
            .markdown
            .contains("**Verdict: does not hold.**")
    );
    assert!(f.language_only.markdown.contains("-5.0 points"));
    // The other findings are unaffected.
    assert_eq!(f.split.verdict, Verdict::Holds);
    assert_eq!(f.recovery.verdict, Verdict::Holds);
}

#[test]
fn split_verdict_uses_the_documented_tolerance() {
    let base = only(&paper_like(), |c| c.id.starts_with("split100"));
    let set = |r: &mut Results, id: &str, score: f64| {
        r.cells.iter_mut().find(|c| c.id == id).unwrap().pruned = vqa(score);
    };
    // 40:60 beats 50:50 by 2 points: within tolerance (max(2, 5 % of 47) = 2.35 points).
    let mut r = base.clone();
    set(&mut r, "split100-3", 0.45 + SPLIT_TOLERANCE_ABS);
    let f = findings(&r);
    assert_eq!(f.split.verdict, Verdict::Holds, "{}", f.split.markdown);
    // By 5 points (range 47, 5 % = 2.35): does not hold.
    set(&mut r, "split100-3", 0.50);
    let f = findings(&r);
    assert_eq!(f.split.verdict, Verdict::DoesNotHold);
    let s = &f.split.sweeps[0];
    assert_eq!(s.points[s.best].label(), "40:60");
    assert!((s.gap.unwrap() - 0.05).abs() < 1e-9);
    assert!((s.tolerance - 0.025).abs() < 1e-9);
    assert!(
        f.split
            .markdown
            .contains("gap 5.0 points, tolerance 2.5 → does not hold")
    );
    // No equal split measured (and no grid cell to stand in): not enough data.
    let r = only(&base, |c| c.id != "split100-4");
    assert_eq!(findings(&r).split.verdict, Verdict::NotEnoughData);
}

#[test]
fn weak_recovery_does_not_hold_and_small_losses_are_not_judged() {
    let mut r = paper_like();
    let c = r.cells.iter_mut().find(|c| c.id == "grid-dsnot-5").unwrap(); // dsnot 2:4
    let pruned = c.pruned.vqa_accuracy.unwrap();
    c.ressa.as_mut().unwrap().metrics = vqa(pruned + 0.1 * (DENSE - pruned));
    let f = findings(&r);
    assert_eq!(f.recovery.verdict, Verdict::DoesNotHold);
    let bad: Vec<_> = f
        .recovery
        .entries
        .iter()
        .filter(|e| e.verdict == Verdict::DoesNotHold)
        .collect();
    assert_eq!(bad.len(), 1);
    assert_eq!(
        (bad[0].variant.method.as_str(), bad[0].setting),
        ("dsnot", Setting::NM(2, 4))
    );
    assert!(bad[0].fraction.unwrap() < RECOVERY_CLEAR);
    assert!(f.recovery.markdown.contains("recovered 10 % → not clear"));

    // A cell that lost under 1 point is listed but not judged.
    let mut r = only(&paper_like(), |c| c.id == "grid-wanda-1");
    r.cells[0].pruned = vqa(DENSE - 0.005);
    r.cells[0].ressa.as_mut().unwrap().metrics = vqa(DENSE - 0.004);
    let f = findings(&r);
    assert_eq!(f.recovery.verdict, Verdict::NotEnoughData);
    assert_eq!(f.recovery.entries[0].fraction, None);
    assert!(f.recovery.markdown.contains("not judged"));
}

#[test]
fn missing_cells_give_not_enough_data() {
    let mut r = only(&paper_like(), |c| c.group == Group::Grid);
    for c in &mut r.cells {
        c.ressa = None;
    }
    let f = findings(&r);
    assert_eq!(f.split.verdict, Verdict::NotEnoughData);
    assert_eq!(f.language_only.verdict, Verdict::NotEnoughData);
    assert_eq!(f.recovery.verdict, Verdict::NotEnoughData);
    assert!(f.recovery.markdown.contains("no RESSA run"));
}

#[test]
fn cider_is_the_fallback_metric() {
    let mut r = paper_like();
    let to_cider = |m: &mut Metrics| {
        *m = Metrics {
            vqa_accuracy: None,
            cider: m.vqa_accuracy.map(|x| x * 2.0),
            bleu4: None,
            tasks: BTreeMap::new(),
        }
    };
    to_cider(&mut r.dense);
    for c in &mut r.cells {
        to_cider(&mut c.pruned);
        if let Some(x) = c.ressa.as_mut() {
            to_cider(&mut x.metrics);
        }
    }
    let f = findings(&r);
    assert_eq!(f.metric, Some(PrimaryMetric::Cider));
    assert_eq!(f.language_only.verdict, Verdict::Holds);
    assert_eq!(f.recovery.verdict, Verdict::Holds);
    // Neither metric: nothing to compare.
    for c in &mut r.cells {
        c.pruned = Metrics::default();
        c.ressa = None;
    }
    r.dense = Metrics::default();
    let f = findings(&r);
    assert_eq!(f.metric, None);
    assert_eq!(f.split.verdict, Verdict::NotEnoughData);
}

fn decode(path: &std::path::Path) -> image::DynamicImage {
    image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn write_report_writes_tables_verdicts_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("nested/report");
    let files = write_report(&paper_like(), &out).unwrap();
    let md = std::fs::read_to_string(&files.report).unwrap();

    assert!(md.starts_with("# RESSA experiment report: paper-like \\| synthetic\n"));
    for needle in [
        "| machine | test machine |",
        "| dense | 49.5 | 121.0 | 40.0 |",
        "| chance | 5.0 | — | — |",
        "| (a) Equal vision/language sparsity is near the best split | **holds** |",
        "| (b) Pruning only the language model hurts less than pruning both | **holds** |",
        "| (c) RESSA recovers a clear part of the pruning loss | **holds** |",
        "## Grid: both towers pruned equally",
        "| wanda | 50% | 45.0 | 47.7 | 60 % | 2.5000 → 1.2500 | 390 | grid-wanda-1 |",
        "| wanda | 60% | 28.7 | — | — | — | — | grid-wanda-2 |",
        "| wanda | unstructured | 100% | 50:50 | 45.0 | ★= | split100-4 |",
        "| wanda | unstructured | 120% | 60:60 | 28.7 | ★= | grid-wanda-2 |",
        "| wanda | 70% | 4.6 | 31.3 | 16.8 |",
        "| calibration | 10.0 |",
        "![score vs vision/language split](split.png)",
        "![V+L vs language-only vs vision-only](towers.png)",
        "![pruned vs pruned + RESSA](ressa.png)",
    ] {
        assert!(md.contains(needle), "missing {needle:?} in\n{md}");
    }
    assert_eq!(md.matches("**Verdict: holds.**").count(), 3);

    let plots: Vec<_> = files.plots().collect();
    assert_eq!(plots.len(), 3);
    for p in plots {
        let img = decode(p);
        assert_eq!((img.width(), img.height()), (800, 500), "{}", p.display());
        // Something was drawn: not a blank canvas.
        let rgb = img.to_rgb8();
        assert!(rgb.pixels().any(|px| px.0 != [255, 255, 255]));
    }
    // Only the final files remain (temp files renamed away).
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["report.md", "ressa.png", "split.png", "towers.png"]);

    // Rewriting over an existing report works.
    write_report(&paper_like(), &out).unwrap();
}

#[test]
fn write_report_reports_does_not_hold_and_skips_missing_plots() {
    let mut r = only(&paper_like(), |c| c.group != Group::Split);
    for c in r
        .cells
        .iter_mut()
        .filter(|c| c.group == Group::LanguageOnly)
    {
        c.pruned = vqa(0.0);
    }
    for c in &mut r.cells {
        c.ressa = None;
    }
    let dir = tempfile::tempdir().unwrap();
    let files = write_report(&r, dir.path()).unwrap();
    assert_eq!(files.split_plot, None);
    assert_eq!(files.ressa_plot, None);
    assert!(files.towers_plot.is_some());
    let md = std::fs::read_to_string(&files.report).unwrap();
    assert!(md.contains(
        "| (b) Pruning only the language model hurts less than pruning both | **does not hold** |"
    ));
    assert!(md.contains("**Verdict: does not hold.**"));
    assert_eq!(md.matches("**Verdict: not enough data.**").count(), 2);
    assert!(!md.contains("split.png") && !md.contains("ressa.png"));
    assert!(!dir.path().join("split.png").exists());
}

#[test]
fn many_methods_make_a_taller_plot() {
    let mut r = paper_like();
    let extra: Vec<Cell> = r
        .cells
        .iter()
        .filter(|c| c.method == "wanda" && c.group != Group::Split)
        .map(|c| Cell {
            id: format!("{}-owl", c.id),
            allocation: "owl".to_string(),
            ..c.clone()
        })
        .collect();
    r.cells.extend(extra);
    let dir = tempfile::tempdir().unwrap();
    let files = write_report(&r, dir.path()).unwrap();
    // Five RESSA panels (4 methods + wanda/owl): three rows of two.
    let img = decode(files.ressa_plot.as_deref().unwrap());
    assert_eq!((img.width(), img.height()), (800, 750));
    let md = std::fs::read_to_string(&files.report).unwrap();
    assert!(md.contains("| wanda, owl | 50% |"));
}

#[test]
fn invalid_results_are_rejected_before_writing() {
    let mut r = paper_like();
    r.cells[3].vision = 1.0;
    let dir = tempfile::tempdir().unwrap();
    let err = write_report(&r, dir.path()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ReportError::Invalid(_)));
    assert_eq!(msg, "results: cells[3].vision: 1 is outside [0, 1)");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn json_round_trip_and_field_names() {
    let r = paper_like();
    let back = Results::from_json(&r.to_json()).unwrap();
    assert_eq!(back, r);

    // The schema by hand: field names, kebab-case groups, null metrics.
    let text = r#"{
      "schema": "ressa-experiment/1", "name": "s", "created": "t", "machine": "m",
      "dense": {"vqa_accuracy": 0.5, "cider": null, "bleu4": null},
      "chance": {"vqa_accuracy": null, "cider": null, "bleu4": null},
      "cells": [
        {"id": "a", "group": "language-only", "method": "wanda", "pattern": "2:4",
         "vision": 0.0, "language": 0.5, "qformer": 0.0, "allocation": "uniform",
         "pruned": {"vqa_accuracy": 0.4, "cider": null, "bleu4": null},
         "ressa": {"metrics": {"vqa_accuracy": 0.45, "cider": null, "bleu4": null},
                   "loss_before": 2.0, "loss_after": 1.0, "steps": 10, "seconds": 3.0},
         "seconds": 1.0},
        {"id": "b", "group": "vision-only", "method": "wanda", "pattern": "unstructured",
         "vision": 0.5, "language": 0.0, "qformer": 0.0, "allocation": "owl",
         "pruned": {"vqa_accuracy": 0.4, "cider": null, "bleu4": null}, "ressa": null, "seconds": 1.0}
      ],
      "timings": {"eval": 1.5}
    }"#;
    let r = Results::from_json(text).unwrap();
    r.validate().unwrap();
    assert_eq!(r.cells[0].group, Group::LanguageOnly);
    assert_eq!(r.cells[1].group, Group::VisionOnly);
    assert_eq!(r.cells[0].ressa.as_ref().unwrap().steps, 10);
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["cells"][0]["group"], "language-only");
    assert_eq!(json["cells"][1]["ressa"], serde_json::Value::Null);
}

#[test]
fn unknown_fields_are_rejected() {
    let json = serde_json::to_value(paper_like()).unwrap();
    let with = |path: &[&str], key: &str| {
        let mut v = json.clone();
        let mut node = &mut v;
        for p in path {
            node = match p.parse::<usize>() {
                Ok(i) => &mut node[i],
                Err(_) => &mut node[*p],
            };
        }
        node.as_object_mut()
            .unwrap()
            .insert(key.to_string(), 1.into());
        serde_json::to_string(&v).unwrap()
    };
    for (path, key) in [
        (&[][..], "extra"),
        (&["dense"][..], "cider_d"),
        (&["cells", "0"][..], "sparsity"),
        (&["cells", "1", "ressa"][..], "lr"),
        (&["cells", "1", "ressa", "metrics"][..], "gqa"),
    ] {
        let err = Results::from_json(&with(path, key))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("unknown field `{key}`")), "{err}");
    }
    let bad_group = serde_json::to_string(&json)
        .unwrap()
        .replacen("\"grid\"", "\"both\"", 1);
    let err = Results::from_json(&bad_group).unwrap_err().to_string();
    assert!(err.contains("unknown variant `both`"), "{err}");
}

#[test]
fn validate_errors_name_the_field() {
    let base = paper_like();
    let check = |edit: &dyn Fn(&mut Results), field: &str| {
        let mut r = base.clone();
        edit(&mut r);
        let e = r.validate().unwrap_err();
        assert_eq!(e.field, field, "{e}");
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("{field}: ")) && !msg.contains('\n'),
            "{msg}"
        );
    };
    check(&|r| r.schema = "ressa-experiment/2".into(), "schema");
    check(&|r| r.name = " ".into(), "name");
    check(&|r| r.dense.vqa_accuracy = Some(49.5), "dense.vqa_accuracy");
    check(&|r| r.chance.cider = Some(-1.0), "chance.cider");
    check(&|r| r.cells.clear(), "cells");
    check(
        &|r| r.cells[4].id = "grid-magnitude-0".into(),
        "cells[4].id",
    );
    check(&|r| r.cells[2].language = -0.1, "cells[2].language");
    check(&|r| r.cells[2].qformer = 1.0, "cells[2].qformer");
    check(&|r| r.cells[2].pattern = "4:2".into(), "cells[2].pattern");
    check(&|r| r.cells[2].method = String::new(), "cells[2].method");
    check(&|r| r.cells[2].vision = 0.4, "cells[2].language");
    check(
        &|r| r.cells[1].pruned.bleu4 = Some(2.0),
        "cells[1].pruned.bleu4",
    );
    check(&|r| r.cells[1].seconds = f64::NAN, "cells[1].seconds");
    check(
        &|r| r.cells[1].ressa.as_mut().unwrap().metrics.vqa_accuracy = Some(1.5),
        "cells[1].ressa.metrics.vqa_accuracy",
    );
    check(
        &|r| r.cells[1].ressa.as_mut().unwrap().loss_after = f64::INFINITY,
        "cells[1].ressa.loss_after",
    );
    let lo = base
        .cells
        .iter()
        .position(|c| c.group == Group::LanguageOnly)
        .unwrap();
    check(
        &move |r| r.cells[lo].vision = 0.1,
        &format!("cells[{lo}].vision"),
    );
    let vo = base
        .cells
        .iter()
        .position(|c| c.group == Group::VisionOnly)
        .unwrap();
    check(
        &move |r| r.cells[vo].language = 0.1,
        &format!("cells[{vo}].language"),
    );
    check(
        &|r| {
            r.timings.insert("eval".into(), -1.0);
        },
        "timings.eval",
    );
}

#[test]
fn read_results_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.json");
    let e = read_results(&missing).unwrap_err().to_string();
    assert!(e.starts_with(&missing.display().to_string()), "{e}");

    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\n  \"schema\": 1\n}").unwrap();
    let e = read_results(&bad).unwrap_err().to_string();
    assert!(
        e.starts_with(&bad.display().to_string()) && e.contains("line 2"),
        "{e}"
    );
    assert!(!e.contains('\n'));

    let good = dir.path().join("results.json");
    std::fs::write(&good, paper_like().to_json()).unwrap();
    assert_eq!(read_results(&good).unwrap(), paper_like());
    let mut r = paper_like();
    r.cells[0].pattern = "dense".into();
    std::fs::write(&good, r.to_json()).unwrap();
    let e = read_results(&good).unwrap_err().to_string();
    assert!(e.starts_with("results: cells[0].pattern: \"dense\""), "{e}");
}

/// `paper_like` with three named tasks (VQAv2 with question types, GQA, NoCaps) in every
/// model's metrics, and Wanda at 50 % and 70 % also with OWL (+5 points pruned, +1 repaired).
fn with_tasks_and_owl() -> Results {
    use ressa_report::{OwlParams, Task, TaskMetrics, TypeScore};
    let mut r = paper_like();
    let owl: Vec<Cell> = r
        .cells
        .iter()
        .filter(|c| {
            c.group == Group::Grid
                && c.method == "wanda"
                && c.pattern == "unstructured"
                && (c.language == 0.5 || c.language == 0.7)
        })
        .map(|c| {
            let mut o = c.clone();
            o.id = format!("{}-owl", c.id);
            o.allocation = "owl".into();
            o.owl = Some(OwlParams {
                m: 5.0,
                lambda: 0.08,
            });
            o.pruned = vqa(c.pruned.vqa_accuracy.unwrap() + 0.05);
            let rm = &mut o.ressa.as_mut().unwrap().metrics;
            *rm = vqa(rm.vqa_accuracy.unwrap() + 0.01);
            o
        })
        .collect();
    assert_eq!(owl.len(), 2);
    r.cells.extend(owl);
    r.tasks = vec![
        Task {
            name: "VQAv2".into(),
            kind: "vqa".into(),
            file: "annotations/vqav2_test.json".into(),
            items: 100,
        },
        Task {
            name: "GQA".into(),
            kind: "vqa".into(),
            file: "annotations/gqa_testdev.json".into(),
            items: 50,
        },
        Task {
            name: "NoCaps".into(),
            kind: "caption".into(),
            file: "annotations/nocaps_val_eval.json".into(),
            items: 20,
        },
    ];
    let fill = |m: &mut Metrics| {
        let x = m.vqa_accuracy.unwrap();
        let types = BTreeMap::from([
            (
                "how many".to_string(),
                TypeScore {
                    accuracy: x * 0.4,
                    items: 10,
                },
            ),
            (
                "what color is the".to_string(),
                TypeScore {
                    accuracy: x,
                    items: 20,
                },
            ),
        ]);
        m.tasks = BTreeMap::from([
            (
                "VQAv2".to_string(),
                TaskMetrics {
                    vqa_accuracy: Some(x),
                    by_question_type: types,
                    ..Default::default()
                },
            ),
            (
                "GQA".to_string(),
                TaskMetrics {
                    vqa_accuracy: Some(x * 0.4),
                    ..Default::default()
                },
            ),
            (
                "NoCaps".to_string(),
                TaskMetrics {
                    cider: Some(1.0),
                    bleu4: Some(0.3),
                    ..Default::default()
                },
            ),
        ]);
    };
    fill(&mut r.dense);
    r.chance.tasks.clear();
    for c in &mut r.cells {
        fill(&mut c.pruned);
        if let Some(x) = c.ressa.as_mut() {
            fill(&mut x.metrics);
        }
    }
    r
}

#[test]
fn owl_tasks_and_question_types_get_their_tables() {
    let r = with_tasks_and_owl();
    r.validate().unwrap();
    assert_eq!(r.first_vqa_task().unwrap().name, "VQAv2");
    // serde_json parses floats to the nearest value only without `float_roundtrip`: compare
    // the structure and the shown values, not the last bit.
    let back = Results::from_json(&r.to_json()).unwrap();
    back.validate().unwrap();
    assert_eq!(back.tasks, r.tasks);
    assert_eq!(back.cells.last().unwrap().owl, r.cells.last().unwrap().owl);
    assert_eq!(
        back.dense.tasks["VQAv2"]
            .by_question_type
            .keys()
            .collect::<Vec<_>>(),
        ["how many", "what color is the"]
    );
    let json = serde_json::to_value(&r).unwrap();
    let owl = &json["cells"][r.cells.len() - 1];
    assert_eq!(owl["allocation"], "owl");
    assert_eq!(owl["owl"]["lambda"], 0.08);
    assert_eq!(
        json["dense"]["tasks"]["VQAv2"]["by_question_type"]["how many"]["items"],
        10
    );

    let dir = tempfile::tempdir().unwrap();
    let files = write_report(&r, dir.path()).unwrap();
    let md = std::fs::read_to_string(&files.report).unwrap();
    // OWL vs uniform: wanda 50 % pruned 45.0 → 50.0, RESSA 47.7 → 48.7.
    assert!(md.contains("## Allocation: OWL vs uniform"), "{md}");
    assert!(md.contains("M = 5, λ = 0.08"));
    assert!(
        md.contains("| wanda | 50% | uniform | 45.0 | 47.7 |  |  |"),
        "{md}"
    );
    assert!(
        md.contains("| wanda | 50% | owl | 50.0 | 48.7 | +5.0 | +1.0 |"),
        "{md}"
    );
    assert!(md.contains("| wanda | 70% | owl | 9.6 |"), "{md}");
    // One column per task; the findings' task named.
    assert!(md.contains("first VQA task's, `VQAv2`"));
    assert!(md.contains(
        "| model | VQAv2 (VQA, 100 items) | GQA (VQA, 50 items) | NoCaps (CIDEr, 20 items) |"
    ));
    assert!(md.contains("| dense | 49.5 | 19.8 | 100.0 |"), "{md}");
    assert!(md.contains("| wanda, owl 50% | 50.0 → 48.7 | 20.0 → 19.5 | 100.0 → 100.0 |"));
    // By question type at 70 %, the highest unstructured setting: wanda 70 % pruned 4.6
    // (× 0.4 = 1.8), repaired 31.5 (× 0.4 = 12.6).
    assert!(md.contains("## Accuracy by question type"));
    assert!(md.contains("every grid cell at 70%"));
    let header = md
        .lines()
        .find(|l| l.starts_with("| question type | items | dense |"))
        .unwrap();
    assert!(header.contains("| wanda 70% |") && header.contains("| wanda, owl 70% |"));
    assert!(!header.contains("50%"), "{header}");
    assert!(header.starts_with("| question type | items | dense | chance |"));
    let row = md.lines().find(|l| l.starts_with("| how many |")).unwrap();
    assert!(row.starts_with("| how many | 10 | 19.8 | — |"), "{row}");
    assert!(row.contains("| 1.8 → 12.6 |"), "{row}");
    // The blind floor per type, where the chance model has one.
    let mut blind = r.clone();
    blind.chance.tasks = blind.dense.tasks.clone();
    let vqa = blind.chance.tasks.get_mut("VQAv2").unwrap();
    vqa.by_question_type.get_mut("how many").unwrap().accuracy = 0.02;
    let md = std::fs::read_to_string(write_report(&blind, dir.path()).unwrap().report).unwrap();
    let row = md.lines().find(|l| l.starts_with("| how many |")).unwrap();
    assert!(row.starts_with("| how many | 10 | 19.8 | 2.0 |"), "{row}");

    // Without tasks (older files) none of the task tables appear.
    let mut old = paper_like();
    old.cells.retain(|c| c.allocation == "uniform");
    let md = std::fs::read_to_string(write_report(&old, dir.path()).unwrap().report).unwrap();
    assert!(!md.contains("## Tasks") && !md.contains("## Accuracy by question type"));
    assert!(!md.contains("## Allocation: OWL vs uniform"));
}

#[test]
fn bad_tasks_and_owl_fields_are_rejected() {
    let base = with_tasks_and_owl();
    let mut r = base.clone();
    r.cells[0]
        .pruned
        .tasks
        .insert("OK-VQA".into(), Default::default());
    assert_eq!(
        r.validate().unwrap_err().to_string(),
        "cells[0].pruned.tasks: \"OK-VQA\" is not one of the study's tasks"
    );
    let mut r = base.clone();
    r.tasks[2].kind = "retrieval".into();
    assert_eq!(
        r.validate().unwrap_err().to_string(),
        "tasks[2].kind: \"retrieval\" is not one of vqa, caption"
    );
    let mut r = base.clone();
    r.tasks[1].name = "VQAv2".into();
    assert!(
        r.validate()
            .unwrap_err()
            .to_string()
            .starts_with("tasks[1].name: \"VQAv2\" is also the name of tasks[0]")
    );
    let mut r = base.clone();
    r.cells[0].owl = r.cells.last().unwrap().owl;
    assert_eq!(
        r.validate().unwrap_err().to_string(),
        "cells[0].owl: is set but allocation is \"uniform\""
    );
    let mut r = base;
    let t = r.dense.tasks.get_mut("VQAv2").unwrap();
    t.by_question_type.get_mut("how many").unwrap().accuracy = 1.5;
    assert_eq!(
        r.validate().unwrap_err().to_string(),
        "dense.tasks.VQAv2.by_question_type.how many.accuracy: 1.5 is outside [0, 1]"
    );
}
