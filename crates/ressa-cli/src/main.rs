//! `ressa`: prune vision-language models and repair them afterwards.

mod backend;
mod eval;
mod export;
mod generate;
mod inspect;
mod logits;
mod nodes;
mod output;
mod prune;
mod repair;
mod score;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use backend::BackendKind;

#[derive(Parser)]
#[command(
    name = "ressa",
    version,
    about = "Prune vision-language models and repair them (RESSA)"
)]
struct Cli {
    /// Compute backend (those compiled in through cargo features).
    #[arg(long, value_enum, default_value_t = BackendKind::default(), global = true)]
    backend: BackendKind,
    /// Revision (branch, tag or commit) of a `--model`/`--dense` given as a repo id
    /// (`org/name`) found in the local Hugging Face cache; default `main`.
    #[arg(long, global = true)]
    revision: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text for an image and a prompt.
    Generate(generate::Args),
    /// Teacher-forced logits for inputs in a safetensors file (parity and debugging).
    Logits(logits::Args),
    /// Architecture, parameter counts per tower, dtypes and sparsity of every linear weight.
    Inspect(inspect::Args),
    /// Prune a model layer by layer (magnitude, Wanda, SparseGPT, DSnoT; unstructured or N:M).
    Prune(Box<prune::Args>),
    /// Repair a pruned model with RESSA (SparseLoRA + distillation from the dense model).
    Repair(Box<repair::Args>),
    /// Score a predictions file (VQA accuracy, GQA exact match, CIDEr/BLEU) as one JSON object.
    Score(score::Args),
    /// Generate on a LAVIS annotation list, write official-format predictions, score them.
    Eval(eval::Args),
    /// Write a model as dense tensors or in compressed-tensors' sparse-bitmask format.
    Export(export::Args),
}

fn main() -> ExitCode {
    // A log line that cannot be written (stderr closed: `ressa … 2>&1 | head`) is dropped:
    // tracing-subscriber would otherwise report it with `eprintln!`, which panics, on whatever
    // thread logged (a data-parallel peer among them).
    tracing_subscriber::fmt()
        .log_internal_errors(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            // burn-collective logs every peer's whole configuration at info, and its
            // communication layer every tensor a node downloads.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,burn_collective=warn,burn_communication=warn".into()),
        )
        .init();
    // Subnormal floats cost ~100 cycles per operation on x86 (see `ressa_sparse::fpenv`).
    ressa_sparse::fpenv::flush_subnormals();
    // SIGINT / SIGTERM: remove the run's temporaries (partial outputs, mask spills) and exit
    // as a shell does for an interrupt.
    if let Err(e) = ctrlc::set_handler(|| {
        ressa_scratch::remove_all();
        eprintln!("error: interrupted; partial outputs removed");
        std::process::exit(130);
    }) {
        tracing::warn!(error = %e, "no signal handler: an interrupted run may leave temporaries");
    }
    let cli = Cli::parse();
    backend::set_revision(cli.revision.clone());
    let result = match cli.command {
        Command::Generate(args) => generate::run(cli.backend, args),
        Command::Logits(args) => logits::run(cli.backend, args),
        Command::Inspect(args) => inspect::run(cli.backend, args),
        Command::Score(args) => score::run(args),
        Command::Prune(args) => prune::run(cli.backend, *args),
        Command::Eval(args) => eval::run(cli.backend, args),
        Command::Repair(args) => repair::run(cli.backend, *args),
        Command::Export(args) => export::run(cli.backend, args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A closed stdout (`ressa inspect | head`) is not an error.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
