//! Compare the Rust PTB tokenizer with Java output stored in a fixture-style JSON
//! file (`{"inputs": [...], "java_lines": [...], "tokenized": [...]}`), e.g. one
//! written by `scripts/make_metric_fixtures.py --dev-corpus N --dev-out FILE`.
//!
//! `cargo run -p ressa-eval --example ptb_diff -- FILE [--raw]`
use std::{env, fs};

fn main() {
    let args: Vec<String> = env::args().collect();
    let path = args.get(1).expect("usage: ptb_diff FILE [--raw]");
    let raw = args.iter().any(|a| a == "--raw");
    let v: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(path).expect("read")).expect("json");
    let strs = |k: &str| -> Vec<String> {
        v[k].as_array()
            .expect("array")
            .iter()
            .map(|s| s.as_str().expect("string").to_string())
            .collect()
    };
    let inputs = strs("inputs");
    let (expected, got) = if raw {
        let joined = inputs
            .iter()
            .map(|s| s.replace('\n', " "))
            .collect::<Vec<_>>()
            .join("\n");
        (strs("java_lines"), ressa_eval::ptb::java_lines(&joined))
    } else {
        (
            strs("tokenized"),
            ressa_eval::ptb::tokenize_captions(&inputs),
        )
    };
    let mut bad = 0;
    for (i, input) in inputs.iter().enumerate() {
        let e = expected.get(i).map(String::as_str).unwrap_or("<missing>");
        let g = got.get(i).map(String::as_str).unwrap_or("<missing>");
        if e != g {
            bad += 1;
            println!("#{i} {input:?}\n   java: {e:?}\n   rust: {g:?}");
        }
    }
    println!("{bad} of {} differ", inputs.len());
}
