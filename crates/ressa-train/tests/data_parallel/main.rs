//! Data-parallel RESSA (`TrainConfig::devices`, threads on Flex through burn's collective):
//! N peers at the same global batch train the same adapters as one peer (up to the float
//! summation order), a checkpoint of N peers resumes on another count, and a peer that fails
//! stops every peer with its error instead of leaving them waiting. `multinode`: two processes
//! through burn's orchestrator train what two threads train, and why every all-reduce there is
//! a session of its own (an ignored reproduction of burn-collective's hang).

mod multinode;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use burn::backend::{Autodiff, Flex};
use ressa_models::{InstructBlipT5, Pretrained, Processor};
use ressa_train::checkpoint::{self, HostTensor};
use ressa_train::repair::{DataConfig, train_data};
use ressa_train::sparse_lora::attach;
use ressa_train::trainer::adapter_tensors;
use ressa_train::{TrainConfig, TrainData, TrainError, TrainEvent, TrainReport, train};

type AD = Autodiff<Flex>;
type T5 = InstructBlipT5<AD>;

fn repo(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(p)
}

fn fixture() -> PathBuf {
    repo("tests/fixtures/models/instructblip-t5-a")
}

/// The six captions of the calibration fixture, with images from `images`.
fn data(images: &Path) -> TrainData {
    let device = Default::default();
    let dense = Pretrained::<Flex, InstructBlipT5<Flex>>::load(&fixture(), &device).unwrap();
    let processor = Processor::for_model(&fixture(), &dense.model).unwrap();
    let cfg = DataConfig {
        train: repo("tests/fixtures/calibration/captions.json"),
        images: images.to_path_buf(),
        val: None,
        caption_prompt: None,
        max_examples: None,
    };
    train_data(processor, &cfg).unwrap()
}

/// Trains freshly attached plain-LoRA adapters (the same initial values on every call).
fn run(
    data: &TrainData,
    cfg: &TrainConfig,
    checkpoints: Option<&Path>,
    resume: bool,
) -> Result<(BTreeMap<String, HostTensor>, TrainReport), TrainError> {
    run_with(data, cfg, checkpoints, resume, &mut |_| {})
}

fn run_with(
    data: &TrainData,
    cfg: &TrainConfig,
    checkpoints: Option<&Path>,
    resume: bool,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<(BTreeMap<String, HostTensor>, TrainReport), TrainError> {
    let device = Default::default();
    let dense = Pretrained::<AD, T5>::load(&fixture(), &device).unwrap();
    let (model, _) = attach(
        dense.model,
        &cfg.adapters,
        &BTreeMap::new(),
        &Default::default(),
        cfg.seed,
        &device,
    )
    .unwrap();
    let (model, report) = train(model, data, cfg, checkpoints, resume, &device, on_event)?;
    Ok((adapter_tensors(&model), report))
}

fn max_abs_diff(a: &BTreeMap<String, HostTensor>, b: &BTreeMap<String, HostTensor>) -> f32 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .flat_map(|(k, (shape, x))| {
            assert_eq!(shape, &b[k].0, "{k}");
            x.iter().zip(&b[k].1).map(|(x, y)| (x - y).abs())
        })
        .fold(0.0, f32::max)
}

/// `f` on its own thread, failing the test instead of hanging it.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("no result within {limit:?}: a peer hangs"))
}

#[test]
fn two_and_four_peers_train_the_adapters_of_one_peer() {
    let data = data(&repo("tests/fixtures/calibration"));
    // 6 examples in batches of 4: every epoch ends with a batch of 2, which leaves two of four
    // peers without rows; augmentation on (keyed by the global example position).
    //
    // AdamW's ε is 1e-5 here, not 1e-8: on this random tiny model some gradient components are
    // ~1e-8, at the level of their own rounding noise, and with ε = 1e-8 Adam divides that
    // noise by ~1e-8, so any two summation orders (not only N peers against one) drift apart
    // by ~5e-5 in 20 steps; a larger learning rate (3e-3) amplifies it to ~1e-3 the same way.
    // How far depends on the machine (faer picks its kernels and blocking from the CPU): with
    // ε = 1e-6, 4 peers were 4.0e-6 from one on an AVX2 EPYC and 1.7e-5 on an AVX-512 Xeon;
    // with 1e-5, 4.8e-6 (2 peers) and 1.2e-6 (4 peers) on the Xeon.
    let mut cfg = TrainConfig {
        steps: 20,
        batch_size: 4,
        lr: 1e-3,
        warmup_steps: 2,
        augment: true,
        ..Default::default()
    };
    cfg.adamw.epsilon = 1e-5;
    let t = Instant::now();
    let (one, one_report) = run(&data, &cfg, None, false).unwrap();
    eprintln!("1 peer: {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(one_report.steps, 20);
    let (start, _) = {
        let zero = TrainConfig {
            steps: 1,
            lr: 1e-30,
            ..cfg.clone()
        };
        run(&data, &zero, None, false).unwrap()
    };
    let moved = max_abs_diff(&one, &start);
    assert!(moved > 1e-3, "the adapters barely trained ({moved})");
    for devices in [2, 4] {
        let t = Instant::now();
        let (many, report) = run(
            &data,
            &TrainConfig {
                devices,
                ..cfg.clone()
            },
            None,
            false,
        )
        .unwrap_or_else(|e| panic!("{devices} peers: {e}"));
        let d = max_abs_diff(&one, &many);
        eprintln!(
            "{devices} peers: {:.1} s, max |adapter - one peer's| = {d:e} (trained by {moved:.3})",
            t.elapsed().as_secs_f64()
        );
        assert_eq!(report.steps, 20);
        assert!(d <= 1e-5, "{devices} peers differ from one by {d}");
        let (l1, ln) = (one_report.last_loss.unwrap(), report.last_loss.unwrap());
        assert!((l1 - ln).abs() < 1e-4, "last loss {l1} vs {ln}");
    }
}

#[test]
fn a_checkpoint_of_two_peers_resumes_on_one() {
    let data = data(&repo("tests/fixtures/calibration"));
    let tmp = tempfile::tempdir().unwrap();
    // Two micro-batches of 2 per step: the accumulation is split across peers too.
    let mut cfg = TrainConfig {
        steps: 12,
        batch_size: 2,
        grad_accum: 2,
        lr: 1e-3,
        augment: true,
        checkpoint_every: 6,
        keep_checkpoints: 10,
        devices: 2,
        ..Default::default()
    };
    cfg.adamw.epsilon = 1e-6;
    let dir = tmp.path().join("ckpt");
    let (two, report) = run(&data, &cfg, Some(&dir), false).unwrap();
    assert_eq!(report.steps, 12);
    let end = checkpoint::latest(&dir).unwrap().unwrap();
    assert_eq!(end.state.step, 12);
    assert_eq!(
        end.adapters, two,
        "the last checkpoint holds the final adapters"
    );
    std::fs::remove_dir_all(dir.join("step-00000012")).unwrap();

    let one = TrainConfig {
        devices: 1,
        ..cfg.clone()
    };
    let (resumed, report) = run(&data, &one, Some(&dir), true).unwrap();
    assert_eq!(report.resumed_at, Some(6));
    assert_eq!(report.steps, 12);
    let d = max_abs_diff(&two, &resumed);
    eprintln!("2 peers, resumed at step 6 on 1: max |diff| = {d:e}");
    assert!(d <= 1e-5, "{d}");
}

#[test]
fn a_failing_peer_stops_every_peer_with_its_error() {
    // `c.png` cannot be decoded: only the peer whose shard holds it meets the error.
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    std::fs::create_dir(&images).unwrap();
    for f in ["a.png", "b.png"] {
        std::fs::copy(
            repo("tests/fixtures/calibration/images").join(f),
            images.join(f),
        )
        .unwrap();
    }
    std::fs::write(images.join("c.png"), b"not a png").unwrap();
    let data = data(tmp.path());
    let cfg = TrainConfig {
        steps: 6,
        batch_size: 4,
        devices: 4,
        ..Default::default()
    };
    let err = within(Duration::from_secs(120), move || {
        run(&data, &cfg, None, false)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    });
    assert!(err.contains("c.png") && err.lines().count() == 1, "{err}");

    // A diverging learning rate: every peer sees the same non-finite loss and stops.
    let data = self::data(&repo("tests/fixtures/calibration"));
    let cfg = TrainConfig {
        steps: 10,
        batch_size: 2,
        lr: 1e30,
        devices: 2,
        ..Default::default()
    };
    let err = within(Duration::from_secs(120), move || {
        run(&data, &cfg, None, false)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    });
    assert!(err.contains("training stopped"), "{err}");

    // A panic outside the guarded parts (here: in the caller's event callback, on the first
    // peer's thread, while the others go on to their next all-reduce) resets the collective,
    // so the others fail instead of waiting; the run returns the panic.
    let data = self::data(&repo("tests/fixtures/calibration"));
    let cfg = TrainConfig {
        steps: 10,
        batch_size: 4,
        devices: 4,
        ..Default::default()
    };
    let err = within(Duration::from_secs(120), move || {
        let mut on_event = |e: &TrainEvent| {
            if let TrainEvent::Step { step: 3, .. } = e {
                panic!("boom at step 3");
            }
        };
        run_with(&data, &cfg, None, false, &mut on_event)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    });
    assert_eq!(err, "device 0: panicked: boom at step 3");
}
