//! The calibration set's activations between blocks: one block input per sample, held in
//! memory while their hidden states fit the budget, else split ([`Prunable::split_hidden`])
//! into a frame kept in memory and the hidden state spilled to a file (one per generation of
//! inputs, removed when the generation is dropped). Spilled values are the f32 bytes of the
//! tensor, read back bit for bit.

use std::cell::Cell;
use std::fs::File;
use std::path::PathBuf;
use std::rc::Rc;

use burn::prelude::*;
use ressa_models::prunable::Prunable;

use crate::calibrate::{ActivationBudget, CalibrateError};

fn io(path: &std::path::Path, e: std::io::Error) -> CalibrateError {
    CalibrateError::Input(format!("{}: {e}", path.display()))
}

/// One spill file, removed when the last handle goes.
pub(crate) struct SpillFile {
    path: PathBuf,
    file: File,
    len: Cell<u64>,
}

impl Drop for SpillFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl SpillFile {
    fn append(&self, bytes: &[u8]) -> Result<u64, CalibrateError> {
        let at = self.len.get();
        write_at(&self.file, bytes, at).map_err(|e| io(&self.path, e))?;
        self.len.set(at + bytes.len() as u64);
        Ok(at)
    }

    fn read(&self, at: u64, len: usize) -> Result<Vec<u8>, CalibrateError> {
        let mut buf = vec![0u8; len];
        read_at(&self.file, &mut buf, at).map_err(|e| io(&self.path, e))?;
        Ok(buf)
    }
}

#[cfg(unix)]
fn write_at(f: &File, bytes: &[u8], at: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(f, bytes, at)
}

#[cfg(unix)]
fn read_at(f: &File, buf: &mut [u8], at: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(f, buf, at)
}

#[cfg(not(unix))]
fn write_at(mut f: &File, bytes: &[u8], at: u64) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    f.seek(SeekFrom::Start(at))?;
    f.write_all(bytes)
}

#[cfg(not(unix))]
fn read_at(mut f: &File, buf: &mut [u8], at: u64) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    f.seek(SeekFrom::Start(at))?;
    f.read_exact(buf)
}

/// The budget and the bytes of hidden states held in memory now, shared by the generations.
pub(crate) struct Spill {
    budget: ActivationBudget,
    resident: Cell<u64>,
    spilled: Cell<u64>,
    files: Cell<u64>,
    warned: Cell<bool>,
}

impl Spill {
    pub(crate) fn new(budget: &ActivationBudget) -> Self {
        Self {
            budget: budget.clone(),
            resident: Cell::new(0),
            spilled: Cell::new(0),
            files: Cell::new(0),
            warned: Cell::new(false),
        }
    }

    /// Bytes written to spill files so far.
    pub(crate) fn spilled(&self) -> u64 {
        self.spilled.get()
    }

    /// Whether `bytes` more fit in memory.
    fn fits(&self, bytes: u64) -> bool {
        match self.budget.bytes {
            None => true,
            Some(b) => self.resident.get() + bytes <= b,
        }
    }

    fn new_file(&self) -> Result<Rc<SpillFile>, CalibrateError> {
        let dir = self
            .budget
            .spill_dir
            .as_ref()
            .expect("checked by the caller");
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let n = self.files.get();
        self.files.set(n + 1);
        let path = dir.join(format!("activations-{n}.f32"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        if !self.warned.replace(true) {
            tracing::info!(
                dir = %dir.display(),
                budget_mib = self.budget.bytes.unwrap_or(0) >> 20,
                "calibration activations exceed their budget: hidden states go to disk"
            );
        }
        Ok(Rc::new(SpillFile {
            path,
            file,
            len: Cell::new(0),
        }))
    }
}

/// A hidden state in memory or in a spill file.
pub(crate) enum Hidden<B: Backend> {
    Mem(Tensor<B, 3>),
    Disk {
        file: Rc<SpillFile>,
        at: u64,
        dims: [usize; 3],
        device: B::Device,
    },
}

impl<B: Backend> Hidden<B> {
    pub(crate) fn load(&self) -> Result<Tensor<B, 3>, CalibrateError> {
        match self {
            Hidden::Mem(t) => Ok(t.clone()),
            Hidden::Disk {
                file,
                at,
                dims,
                device,
            } => {
                let n: usize = dims.iter().product();
                let bytes = file.read(*at, n * 4)?;
                let values: Vec<f32> = bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                Ok(Tensor::from_data(TensorData::new(values, *dims), device))
            }
        }
    }
}

enum Item<B: Backend, I> {
    Whole(I),
    Split { frame: I, hidden: Hidden<B> },
}

/// The block inputs of every sample at one point of a stack.
pub(crate) struct Generation<'s, B: Backend, I> {
    items: Vec<Item<B, I>>,
    spill: &'s Spill,
    file: Option<Rc<SpillFile>>,
    /// Bytes of hidden states this generation holds in memory (counted in `spill.resident`).
    bytes: u64,
}

impl<B: Backend, I> Drop for Generation<'_, B, I> {
    fn drop(&mut self) {
        self.spill
            .resident
            .set(self.spill.resident.get() - self.bytes);
    }
}

fn hidden_bytes<B: Backend>(h: &Tensor<B, 3>) -> u64 {
    h.dims().iter().product::<usize>() as u64 * 4
}

impl<'s, B: Backend, I: Clone> Generation<'s, B, I> {
    pub(crate) fn new(spill: &'s Spill) -> Self {
        Self {
            items: Vec::new(),
            spill,
            file: None,
            bytes: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    /// The same inputs, sharing their memory and spill file (counted once).
    pub(crate) fn share(&self) -> Self {
        Self {
            items: self
                .items
                .iter()
                .map(|it| match it {
                    Item::Whole(i) => Item::Whole(i.clone()),
                    Item::Split { frame, hidden } => Item::Split {
                        frame: frame.clone(),
                        hidden: match hidden {
                            Hidden::Mem(t) => Hidden::Mem(t.clone()),
                            Hidden::Disk {
                                file,
                                at,
                                dims,
                                device,
                            } => Hidden::Disk {
                                file: Rc::clone(file),
                                at: *at,
                                dims: *dims,
                                device: device.clone(),
                            },
                        },
                    },
                })
                .collect(),
            spill: self.spill,
            file: self.file.clone(),
            bytes: 0,
        }
    }

    /// Keeps `h` in memory if it fits the budget, else in this generation's spill file.
    pub(crate) fn keep(&mut self, h: Tensor<B, 3>) -> Result<Hidden<B>, CalibrateError> {
        let bytes = hidden_bytes(&h);
        if self.spill.fits(bytes) || self.spill.budget.spill_dir.is_none() {
            self.bytes += bytes;
            self.spill.resident.set(self.spill.resident.get() + bytes);
            return Ok(Hidden::Mem(h));
        }
        let file = match &self.file {
            Some(f) => Rc::clone(f),
            None => {
                let f = self.spill.new_file()?;
                self.file = Some(Rc::clone(&f));
                f
            }
        };
        let dims = h.dims();
        let device = h.device();
        let values = h
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| CalibrateError::Input(format!("activations: {e:?}")))?;
        let mut bytes = Vec::with_capacity(values.len() * 4);
        for v in &values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        drop(values);
        let at = file.append(&bytes)?;
        self.spill
            .spilled
            .set(self.spill.spilled.get() + bytes.len() as u64);
        Ok(Hidden::Disk {
            file,
            at,
            dims,
            device,
        })
    }

    /// Adds the next sample's input.
    pub(crate) fn push<M: Prunable<B, BlockInput = I>>(
        &mut self,
        model: &M,
        input: I,
    ) -> Result<(), CalibrateError> {
        if self.spill.budget.bytes.is_none() {
            self.items.push(Item::Whole(input));
            return Ok(());
        }
        match model.split_hidden(input) {
            Ok((frame, hidden)) => match self.keep(hidden)? {
                Hidden::Mem(h) => self.items.push(Item::Whole(model.join_hidden(frame, h))),
                disk => self.items.push(Item::Split {
                    frame,
                    hidden: disk,
                }),
            },
            // Not splittable: kept whole.
            Err(input) => self.items.push(Item::Whole(input)),
        }
        Ok(())
    }

    /// Sample `i`'s input.
    pub(crate) fn get<M: Prunable<B, BlockInput = I>>(
        &self,
        model: &M,
        i: usize,
    ) -> Result<I, CalibrateError> {
        match &self.items[i] {
            Item::Whole(input) => Ok(input.clone()),
            Item::Split { frame, hidden } => Ok(model.join_hidden(frame.clone(), hidden.load()?)),
        }
    }
}
