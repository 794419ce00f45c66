//! `ressa inspect`: what a checkpoint holds.

use std::collections::BTreeMap;
use std::path::PathBuf;

use std::io::Write;

use anyhow::Result;
use burn::prelude::*;
use ressa_models::Pretrained;

use crate::backend::BackendKind;
use crate::with_backend;

#[derive(clap::Args)]
pub struct Args {
    /// HF model directory.
    #[arg(long)]
    model: PathBuf,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(kind: BackendKind, args: Args) -> Result<()> {
    with_backend!(kind, |device: B| run_on::<B>(&args, &device))
}

fn run_on<B: Backend>(args: &Args, device: &B::Device) -> Result<()> {
    let pretrained = Pretrained::<B>::load(&args.model, device)?;
    let mut towers: BTreeMap<String, usize> = BTreeMap::new();
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    let mut linears = Vec::new();
    for (name, t) in pretrained.model.export() {
        let n: usize = t.shape().iter().product();
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
        if name.ends_with(".weight") && t.shape().len() == 2 && is_linear(&name) {
            let zeros = t.to_f32().iter().filter(|v| **v == 0.0).count();
            linears.push((name, t.shape(), zeros as f64 / n as f64));
        }
    }
    let arch = format!("{:?}", pretrained.config.architecture);
    let mut out = std::io::stdout().lock();
    if args.json {
        let json = serde_json::json!({
            "architecture": arch,
            "parameters": towers,
            "total": towers.values().sum::<usize>(),
            "dtypes": dtypes,
            "linears": linears.iter().map(|(n, s, z)| serde_json::json!({"name": n, "shape": s, "sparsity": z})).collect::<Vec<_>>(),
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
    writeln!(out, "linear weights (sparsity = fraction of exact zeros):")?;
    for (name, shape, s) in &linears {
        writeln!(out, "  {name:<72} {:>14} {s:>8.4}", format!("{shape:?}"))?;
    }
    Ok(())
}

/// Linear weights: every 2-D `.weight` except embedding tables.
fn is_linear(name: &str) -> bool {
    !(name.contains("embeddings")
        || name.contains("shared")
        || name.contains("relative_attention_bias")
        || name.contains("embed_tokens"))
}
