//! `ressa score`: metrics of a predictions file against official ground truth, as one JSON object.

use std::path::PathBuf;

use anyhow::Result;
use ressa_eval::Task;

#[derive(clap::Args)]
pub struct Args {
    /// vqav2 | okvqa | gqa | coco-caption | nocaps
    #[arg(long, value_parser = parse_task)]
    task: Task,
    /// Predictions in the official result format: `[{"question_id","answer"}]` or
    /// `[{"image_id","caption"}]`.
    #[arg(long)]
    predictions: PathBuf,
    /// Ground truth: the VQA annotation file (and optionally its question file), a GQA list,
    /// or a COCO-format caption file.
    #[arg(long, num_args = 1.., required = true)]
    annotations: Vec<PathBuf>,
}

fn parse_task(s: &str) -> Result<Task, String> {
    s.parse::<Task>().map_err(|e| e.to_string())
}

pub fn run(args: Args) -> Result<()> {
    let metrics = ressa_eval::score_files(args.task, &args.predictions, &args.annotations)?;
    println!("{}", serde_json::to_string(&metrics)?);
    Ok(())
}
