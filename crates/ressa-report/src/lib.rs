//! Experiment reports for RESSA.
//!
//! `cargo xtask experiment` runs every cell of a study and writes `results.json`
//! ([`Results`], schema `ressa-experiment/1`). This crate turns it into `report.md` and
//! three PNG plots mirroring the paper's figures, and judges the paper's three findings
//! from the numbers ([`findings()`]):
//!
//! | finding | criterion | module |
//! |---|---|---|
//! | (a) equal s_v = s_l is near the best split at a fixed sum | gap ≤ max(2 points, 5 % of the sweep's range) | [`findings::split`] |
//! | (b) language-only pruning hurts less than V+L | language-only ≥ V+L in most pairs | [`findings::language_only`] |
//! | (c) RESSA recovers a clear part of the loss | ≥ 25 % of dense − pruned, every pruner, 50 %/70 %/2:4/4:8 | [`findings::recovery`] |
//!
//! The primary metric is VQA accuracy if the study measured it, else CIDEr.

pub mod error;
pub mod findings;
mod markdown;
pub mod plots;
pub mod results;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub use error::ReportError;
pub use findings::{Findings, PrimaryMetric, Verdict};
pub use results::{
    Cell, Group, Metrics, OwlParams, Ressa, Results, SCHEMA, Task, TaskMetrics, TypeScore,
    ValidationError,
};

/// File name of the report.
pub const REPORT_FILE: &str = "report.md";
/// Plot 1: score vs vision/language split at a fixed sum.
pub const SPLIT_PLOT: &str = "split.png";
/// Plot 2: V+L vs language-only vs vision-only.
pub const TOWERS_PLOT: &str = "towers.png";
/// Plot 3: pruned vs pruned + RESSA.
pub const RESSA_PLOT: &str = "ressa.png";

/// What [`write_report`] wrote. A plot is `None` when the study has no cells for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportFiles {
    /// `report.md`.
    pub report: PathBuf,
    /// `split.png`.
    pub split_plot: Option<PathBuf>,
    /// `towers.png`.
    pub towers_plot: Option<PathBuf>,
    /// `ressa.png`.
    pub ressa_plot: Option<PathBuf>,
}

impl ReportFiles {
    /// The plots written.
    pub fn plots(&self) -> impl Iterator<Item = &Path> {
        [&self.split_plot, &self.towers_plot, &self.ressa_plot]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
    }
}

/// Judges the paper's three findings from the numbers.
pub fn findings(results: &Results) -> Findings {
    Findings::evaluate(results)
}

/// Reads, parses and validates `results.json`.
pub fn read_results(path: &Path) -> Result<Results, ReportError> {
    let text = fs::read_to_string(path).map_err(|source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let results = Results::from_json(&text).map_err(|source| ReportError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    results.validate()?;
    Ok(results)
}

/// Validates `results`, then writes `report.md` and the plots into `out_dir` (created if
/// missing). Every file is written to a temporary name and renamed into place.
pub fn write_report(results: &Results, out_dir: &Path) -> Result<ReportFiles, ReportError> {
    results.validate()?;
    fs::create_dir_all(out_dir).map_err(|source| ReportError::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let found = findings(results);
    let plot = |name: &str, png: Result<Option<Vec<u8>>, String>| {
        let path = out_dir.join(name);
        match png {
            Ok(Some(bytes)) => write_atomic(&path, &bytes).map(|()| Some(path)),
            Ok(None) => Ok(None),
            Err(message) => Err(ReportError::Plot { path, message }),
        }
    };
    let metric = found.metric;
    let split_plot = plot(SPLIT_PLOT, plots::split_plot(results, &found))?;
    let towers_plot = plot(TOWERS_PLOT, plots::towers_plot(results, metric))?;
    let ressa_plot = plot(RESSA_PLOT, plots::ressa_plot(results, metric))?;
    let links = markdown::Links {
        split: split_plot.is_some().then_some(SPLIT_PLOT),
        towers: towers_plot.is_some().then_some(TOWERS_PLOT),
        ressa: ressa_plot.is_some().then_some(RESSA_PLOT),
    };
    let text = markdown::render(results, &found, &links);
    let report = out_dir.join(REPORT_FILE);
    write_atomic(&report, text.as_bytes())?;
    Ok(ReportFiles {
        report,
        split_plot,
        towers_plot,
        ressa_plot,
    })
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, and renames it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let io = |source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io)
}
