//! `sparse-bitmask` against compressed-tensors itself.
//!
//! `tests/fixtures/bitmask/bitmask.safetensors` holds three layers of a
//! `ressa export --format bitmask` of the `instructblip-t5-a` fixture pruned by magnitude to
//! 50 %, and `decompressed.safetensors` what compressed-tensors 0.13.0's `BitmaskCompressor`
//! decompressed them to (`scripts/make_bitmask_fixtures.py`). ressa's reader must decode the
//! same bits, and today's `ressa prune` + `ressa export` must write the same tensors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ressa_sparse::SparseFormat;
use ressa_sparse::formats::bitmask::read_bitmask_file;
use safetensors::{Dtype, SafeTensors};

const LAYERS: [&str; 3] = [
    "vision_model.encoder.layers.0.mlp.fc2",
    "vision_model.encoder.layers.0.self_attn.qkv",
    "language_model.decoder.block.0.layer.2.DenseReluDense.wo",
];
const PARTS: [&str; 4] = ["shape", "compressed", "bitmask", "row_offsets"];

fn repo(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(p)
}

fn fixture(name: &str) -> PathBuf {
    repo("tests/fixtures/bitmask").join(name)
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ressa(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ressa"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run ressa")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn ressa_decodes_bitmask_like_compressed_tensors() {
    let ours = read_bitmask_file(fixture("bitmask.safetensors")).unwrap();
    let theirs = read(&fixture("decompressed.safetensors"));
    let theirs = SafeTensors::deserialize(&theirs).unwrap();
    assert_eq!(
        ours.keys().map(String::as_str).collect::<Vec<_>>(),
        {
            let mut k: Vec<String> = LAYERS.iter().map(|m| format!("{m}.weight")).collect();
            k.sort();
            k
        },
        "decoded weights"
    );
    assert_eq!(theirs.len(), LAYERS.len());
    for (name, w) in &ours {
        let t = theirs.tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        let [d_out, d_in] = t.shape() else {
            panic!("{name}: shape {:?}", t.shape())
        };
        let (d_out, d_in) = (*d_out, *d_in);
        assert_eq!(w.shape(), (d_in, d_out), "{name}: ressa's [d_in, d_out]");
        let reference: Vec<u32> = t
            .data()
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        // ressa's dense weight is burn's [d_in, d_out]; compressed-tensors' is [d_out, d_in].
        let dense = w.to_dense();
        let mut mismatches = 0;
        for o in 0..d_out {
            for i in 0..d_in {
                if dense[i * d_out + o].to_bits() != reference[o * d_in + i] {
                    mismatches += 1;
                }
            }
        }
        assert_eq!(
            mismatches, 0,
            "{name}: entries differing from compressed-tensors"
        );
        let zeros = reference
            .iter()
            .filter(|&&b| f32::from_bits(b) == 0.0)
            .count();
        assert_eq!(zeros, d_in * d_out - w.nnz(), "{name}: nnz");
        assert_eq!(2 * zeros, d_in * d_out, "{name}: 50 % sparse");
        // The mask is the bitmask's set bits: compressed-tensors' non-zeros here.
        let mask = w.mask();
        for o in 0..d_out {
            for i in 0..d_in {
                assert_eq!(
                    mask.get(i, o),
                    Some(f32::from_bits(reference[o * d_in + i]) != 0.0),
                    "{name}: mask at out {o}, in {i}"
                );
            }
        }
    }
}

#[test]
fn export_reproduces_the_committed_bitmask_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let pruned = tmp.path().join("pruned");
    let bm = tmp.path().join("bm");
    let model = repo("tests/fixtures/models/instructblip-t5-a");
    let out = ressa(&[
        "prune",
        "--model",
        s(&model),
        "--method",
        "magnitude",
        "--sparsity",
        "0.5",
        "--out",
        s(&pruned),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ressa(&["export", s(&pruned), "--format", "bitmask", "--out", s(&bm)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let exported = read(&bm.join("model.safetensors"));
    let exported = SafeTensors::deserialize(&exported).unwrap();
    let committed = read(&fixture("bitmask.safetensors"));
    let committed = SafeTensors::deserialize(&committed).unwrap();
    assert_eq!(committed.len(), LAYERS.len() * PARTS.len());
    for m in LAYERS {
        for p in PARTS {
            let key = format!("{m}.{p}");
            let a = exported
                .tensor(&key)
                .unwrap_or_else(|_| panic!("export has no {key}"));
            let b = committed.tensor(&key).unwrap();
            assert_eq!(a.dtype(), b.dtype(), "{key} dtype");
            assert_eq!(a.shape(), b.shape(), "{key} shape");
            assert!(a.data() == b.data(), "{key}: bytes differ from the fixture");
        }
    }
}
