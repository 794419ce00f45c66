//! Writes the data fixtures (`tests/fixtures/data/` at the repository root, or the directory
//! given as the first argument): small synthetic images and annotation files in the LAVIS and
//! official formats, plus broken inputs for the error tests.
//!
//! `cargo run -p ressa-data --example make_data_fixtures`

#[path = "../tests/support/mod.rs"]
mod support;

fn main() {
    let dir = std::env::args_os()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(support::fixture_dir);
    support::write_fixtures(&dir);
    println!("wrote {}", dir.display());
}
