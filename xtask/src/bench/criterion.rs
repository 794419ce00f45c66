//! Reading criterion's results: every `<id>/new/benchmark.json` + `estimates.json` under a
//! `CRITERION_HOME` directory becomes one [`Measurement`] keyed by the benchmark's full id.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// One benchmark's median time (criterion's bootstrap estimate, nanoseconds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    pub median_ns: f64,
    /// 95 % confidence interval of the median.
    pub lower_ns: f64,
    pub upper_ns: f64,
}

impl Measurement {
    pub fn ms(&self) -> f64 {
        self.median_ns / 1e6
    }
}

#[derive(Deserialize)]
struct BenchmarkJson {
    full_id: String,
}

#[derive(Deserialize)]
struct Interval {
    lower_bound: f64,
    upper_bound: f64,
}

#[derive(Deserialize)]
struct Estimate {
    confidence_interval: Interval,
    point_estimate: f64,
}

#[derive(Deserialize)]
struct EstimatesJson {
    median: Estimate,
}

/// All measurements under `home`, by full id (`group/function/value`).
pub fn read_measurements(home: &Path) -> Result<BTreeMap<String, Measurement>> {
    let mut files = Vec::new();
    find_new_dirs(home, &mut files)?;
    let mut out = BTreeMap::new();
    for dir in files {
        let bench_path = dir.join("benchmark.json");
        let est_path = dir.join("estimates.json");
        let bench: BenchmarkJson = read_json(&bench_path)?;
        let est: EstimatesJson = read_json(&est_path)?;
        let m = est.median;
        if !(m.point_estimate.is_finite() && m.point_estimate > 0.0) {
            bail!(
                "{}: median.point_estimate: expected a positive time in ns, got {}",
                est_path.display(),
                m.point_estimate
            );
        }
        out.insert(
            bench.full_id,
            Measurement {
                median_ns: m.point_estimate,
                lower_ns: m.confidence_interval.lower_bound,
                upper_ns: m.confidence_interval.upper_bound,
            },
        );
    }
    Ok(out)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_slice(&bytes)
        .with_context(|| format!("{}: not criterion's JSON", path.display()))
}

/// Directories named `new` that hold a `benchmark.json` (criterion's latest run of one id).
fn find_new_dirs(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("{}: cannot list", dir.display())),
    };
    for entry in entries {
        let path = entry?.path();
        if !path.is_dir() {
            continue;
        }
        if path.file_name().is_some_and(|n| n == "new") && path.join("benchmark.json").is_file() {
            out.push(path);
        } else {
            find_new_dirs(&path, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes what criterion writes for one id with the given median.
    pub(crate) fn write_fake(home: &Path, id: &str, median_ns: f64) {
        let dir = home.join(id.replace(':', "_")).join("new");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("benchmark.json"),
            format!(r#"{{"group_id":"g","function_id":null,"value_str":null,"throughput":null,"full_id":"{id}","directory_name":"d","title":"{id}"}}"#),
        )
        .unwrap();
        let est = |v: f64| {
            format!(
                r#"{{"confidence_interval":{{"confidence_level":0.95,"lower_bound":{},"upper_bound":{}}},"point_estimate":{v},"standard_error":1.0}}"#,
                v * 0.95,
                v * 1.05
            )
        };
        std::fs::write(
            dir.join("estimates.json"),
            format!(
                r#"{{"mean":{},"median":{},"median_abs_dev":{},"slope":null,"std_dev":{}}}"#,
                est(median_ns),
                est(median_ns),
                est(1.0),
                est(1.0)
            ),
        )
        .unwrap();
    }

    #[test]
    fn reads_nested_ids_and_names_broken_files() {
        let home = tempfile::tempdir().unwrap();
        write_fake(home.path(), "dense_2048x5120/flex/8", 2.5e6);
        write_fake(home.path(), "wanda_2048x5120/prune_2:4", 1.0e8);
        let m = read_measurements(home.path()).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m["dense_2048x5120/flex/8"].ms(), 2.5);
        assert_eq!(m["wanda_2048x5120/prune_2:4"].lower_ns, 0.95e8);

        let bad = home
            .path()
            .join("dense_2048x5120/flex/8/new/estimates.json");
        std::fs::write(&bad, "{\"mean\": 1}").unwrap();
        let err = format!("{:#}", read_measurements(home.path()).unwrap_err());
        assert!(
            err.contains("estimates.json: not criterion's JSON"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }

    #[test]
    fn a_missing_home_has_no_measurements() {
        let home = tempfile::tempdir().unwrap();
        assert!(
            read_measurements(&home.path().join("none"))
                .unwrap()
                .is_empty()
        );
    }
}
