//! Streamed pruning under `--memory-budget`: a 300 MB model (InstructBLIP with a 24-layer,
//! 512-wide LLaMA) pruned with Wanda under a budget of a third of its size stays under the
//! budget (peak resident set of the child process, `getrusage(RUSAGE_CHILDREN)`), and writes
//! what the in-memory path writes, byte for byte. Its own test binary with one test, so the
//! children whose peak `RUSAGE_CHILDREN` reports are this test's.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use burn::backend::Flex;
use ressa_models::InstructBlipLlama;
use ressa_models::pretrained::write_random_checkpoint;

#[path = "support/same_output.rs"]
mod same_output;

fn repo(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(p)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The largest resident set of any child this process has waited for, in bytes.
fn children_max_rss() -> u64 {
    // SAFETY: a zeroed rusage is a valid value for getrusage to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_CHILDREN with a valid pointer.
    assert_eq!(
        unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) },
        0
    );
    // Linux reports kilobytes.
    usage.ru_maxrss as u64 * 1024
}

fn prune(model: &Path, out: &Path, extra: &[&str]) -> Output {
    let cal = repo("tests/fixtures/calibration");
    Command::new(env!("CARGO_BIN_EXE_ressa"))
        .args(["prune", "--model", s(model), "--out", s(out)])
        .args(["--method", "wanda", "--sparsity", "0.5"])
        .args(["--calibration", s(&cal.join("captions.json"))])
        .args(["--images", s(&cal), "--samples", "4"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run ressa")
}

/// The LLaMA fixture's vision tower, Q-Former and tokenizers with a 24 × 512 LLaMA (FFN 1376):
/// 76 M parameters, 304 MB in f32, 12.7 MB per block.
fn write_model(dir: &Path) -> u64 {
    let fixture = repo("tests/fixtures/models/instructblip-llama-mha");
    std::fs::create_dir_all(dir.join("qformer_tokenizer")).unwrap();
    for f in [
        "tokenizer.json",
        "preprocessor_config.json",
        "qformer_tokenizer/tokenizer.json",
    ] {
        std::fs::copy(fixture.join(f), dir.join(f)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture.join("config.json")).unwrap()).unwrap();
    let text = &mut config["text_config"];
    text["hidden_size"] = 512.into();
    text["head_dim"] = 64.into();
    text["num_attention_heads"] = 8.into();
    text["num_key_value_heads"] = 8.into();
    text["intermediate_size"] = 1376.into();
    text["num_hidden_layers"] = 24.into();
    let text = config.to_string();
    std::fs::write(dir.join("config.json"), &text).unwrap();
    let cfg = ressa_models::InstructBlipConfig::from_json(&text, &dir.join("config.json")).unwrap();
    write_random_checkpoint::<Flex, InstructBlipLlama<Flex>>(
        &cfg,
        dir,
        5,
        0.05,
        &Default::default(),
    )
    .unwrap();
    std::fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .len()
}

#[test]
fn a_model_three_times_the_budget_prunes_under_it_and_as_in_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    let size = write_model(&model);
    assert!(size > 300_000_000, "{size}");
    let budget: u64 = 96 << 20;
    let streamed = tmp.path().join("streamed");
    let out = prune(&model, &streamed, &["--memory-budget", "96MiB"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let peak = children_max_rss();
    assert!(
        peak <= budget,
        "streamed prune peaked at {} MiB, above its --memory-budget of {} MiB",
        peak >> 20,
        budget >> 20
    );
    let in_memory = tmp.path().join("in-memory");
    let out = prune(&model, &in_memory, &["--in-memory"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The in-memory path holds the model: the budget is a real constraint.
    assert!(children_max_rss() > size, "{}", children_max_rss());
    same_output::assert_same_output(&streamed, &in_memory, "wanda, 24 × 512 LLaMA");
}
