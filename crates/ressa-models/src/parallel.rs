//! Data-parallel helpers: the devices of `--devices N`, and inference over N model copies
//! (whole batches handed to one thread per device, results kept in input order).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use burn::module::Module;
use burn::prelude::*;
use burn::tensor::backend::DeviceOps;

use crate::error::{ModelError, Result};

/// `n` devices of the kind of `first`, starting at it: `first`'s index, then the following
/// ones (CUDA devices 0..N-1 from the default device). Backends without device indices (CPU
/// backends, wgpu's default device) give `n` times the same device, one thread each.
pub fn device_list<B: Backend>(first: &B::Device, n: usize) -> Result<Vec<B::Device>> {
    if n == 0 {
        return Err(ModelError::Input(
            "--devices 0: expected at least one device".into(),
        ));
    }
    let id = first.id();
    let devices: Vec<B::Device> = (0..n)
        .map(|i| {
            let mut d = id;
            d.index_id = id.index_id.saturating_add(i as u16);
            <B::Device as burn::tensor::backend::Device>::from_id(d)
        })
        .collect();
    if devices.iter().any(|d| d != first) {
        let count = B::device_count(id.type_id);
        let last = id.index_id as usize + n;
        if last > count {
            return Err(ModelError::Input(format!(
                "--devices {n}: the backend sees {count} device(s) of this kind, devices {}..{} do not all exist",
                id.index_id,
                last - 1
            )));
        }
    }
    Ok(devices)
}

/// Runs `f(copy, device, item)` on every item of `items` with one copy of `model` per device
/// of `devices`, each on its own thread taking the next item whenever it is free; returns the
/// results in the items' order. With one device it runs on the calling thread. The first
/// error (in item order among those reached) stops the others from taking more items.
pub fn map_replicas<B, M, I, T, E, F>(
    model: &M,
    devices: &[B::Device],
    items: I,
    f: F,
) -> std::result::Result<Vec<T>, E>
where
    B: Backend,
    M: Module<B>,
    I: Iterator + Send,
    I::Item: Send,
    T: Send,
    E: From<ModelError> + Send,
    F: Fn(&M, &B::Device, I::Item) -> std::result::Result<T, E> + Sync,
{
    match devices {
        [] => Err(ModelError::Input("no device to run on".into()).into()),
        [device] => items.map(|item| f(model, device, item)).collect(),
        _ => {
            let queue = Mutex::new(items.enumerate());
            let stop = AtomicBool::new(false);
            let results: Mutex<Vec<(usize, std::result::Result<T, E>)>> = Mutex::new(Vec::new());
            std::thread::scope(|s| {
                for (rank, device) in devices.iter().enumerate() {
                    let copy = if rank == 0 || device == &devices[0] {
                        model.clone()
                    } else {
                        model.clone().to_device(device)
                    };
                    let (queue, stop, results, f) = (&queue, &stop, &results, &f);
                    s.spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
                            let Some((i, item)) = next else { break };
                            let r = f(&copy, device, item);
                            if r.is_err() {
                                stop.store(true, Ordering::Relaxed);
                            }
                            results
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push((i, r));
                        }
                    });
                }
            });
            let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
            results.sort_by_key(|(i, _)| *i);
            results.into_iter().map(|(_, r)| r).collect()
        }
    }
}
