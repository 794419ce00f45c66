//! `ressa inspect`: what a checkpoint holds.

use std::collections::BTreeMap;
use std::path::PathBuf;

use std::io::Write;

use anyhow::Result;
use burn::prelude::*;
use ressa_models::pretrained::model_tensors;
use ressa_models::prunable::prunable_linears;
use ressa_models::{Pretrained, VisionLanguageModel};

use crate::backend::{BackendKind, ModelJob, run_model_job};

#[derive(clap::Args)]
pub struct Args {
    /// HF model directory.
    #[arg(long)]
    model: PathBuf,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(kind: BackendKind, mut args: Args) -> Result<()> {
    args.model = crate::backend::model_dir(&args.model)?;
    let dir = args.model.clone();
    run_model_job(kind, &dir, args)
}

impl ModelJob for Args {
    fn run<B: Backend, M: VisionLanguageModel<B>>(
        self,
        config: M::Config,
        device: &B::Device,
    ) -> Result<()> {
        let pretrained = Pretrained::<B, M>::load_with(&self.model, config, device)?;
        let arch = ressa_models::family::describe(&self.model.join("config.json"))?;
        report(&pretrained, arch, self.json)
    }
}

fn report<B: Backend, M: VisionLanguageModel<B>>(
    pretrained: &Pretrained<B, M>,
    arch: &str,
    json: bool,
) -> Result<()> {
    let prunable: BTreeMap<String, &'static str> = prunable_linears(&pretrained.model)
        .into_iter()
        .map(|(tower, l)| (format!("{}.weight", l.key), tower.name()))
        .collect();
    let mut towers: BTreeMap<String, usize> = BTreeMap::new();
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    let mut linears = Vec::new();
    for (name, t) in model_tensors(&pretrained.model, &pretrained.layout, &pretrained.dir)? {
        let shape = t.shape();
        let n: usize = shape.iter().product();
        *towers
            .entry(name.split('.').next().unwrap_or("").to_string())
            .or_default() += n;
        let dtype = pretrained
            .layout
            .dtypes
            .get(&name)
            .map(|d| format!("{d:?}"))
            .unwrap_or("F32".into());
        *dtypes.entry(dtype).or_default() += n;
        if let Some(tower) = prunable.get(&name) {
            let zeros = t.to_f32().iter().filter(|v| **v == 0.0).count();
            linears.push((name, *tower, shape, zeros as f64 / n.max(1) as f64));
        }
    }
    let mut out = std::io::stdout().lock();
    if json {
        let json = serde_json::json!({
            "architecture": arch,
            "parameters": towers,
            "total": towers.values().sum::<usize>(),
            "dtypes": dtypes,
            "linears": linears.iter().map(|(n, t, s, z)| serde_json::json!({"name": n, "tower": t, "shape": s, "sparsity": z})).collect::<Vec<_>>(),
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&json)?)?;
        return Ok(());
    }
    writeln!(out, "architecture: {arch}")?;
    writeln!(out, "parameters:")?;
    for (tower, n) in &towers {
        writeln!(out, "  {tower:<24} {n:>14}")?;
    }
    writeln!(
        out,
        "  {:<24} {:>14}",
        "total",
        towers.values().sum::<usize>()
    )?;
    writeln!(out, "dtypes (parameters):")?;
    for (d, n) in &dtypes {
        writeln!(out, "  {d:<24} {n:>14}")?;
    }
    writeln!(
        out,
        "prunable linear weights (sparsity = fraction of exact zeros):"
    )?;
    for (name, _, shape, s) in &linears {
        writeln!(out, "  {name:<72} {:>14} {s:>8.4}", format!("{shape:?}"))?;
    }
    Ok(())
}
