//! GPU products `y = x · W` for the packed formats, written in CubeCL and generic over
//! [`cubecl::Runtime`] (features `gpu`, `wgpu`, `cuda`).
//!
//! Same math as the CPU kernels: `x` is `[tokens, d_in]` row-major, `W` is `[d_in, d_out]`
//! (burn orientation), `y` is `[tokens, d_out]` row-major and `y[t, j] = Σ_i x[t, i] · W[i, j]`,
//! summed in `f32`. A [`GpuSparseWeight`] is uploaded once from a packed CPU weight (the
//! format's own packing is reused, nothing is re-derived from a dense matrix) and multiplies
//! device matrices ([`GpuMatrix`]) with [`GpuSparseWeight::matmul`].
//!
//! # Kernels and device layouts
//! All kernels take a tile of `TT` tokens (1, 2, 4 or 8, a compile-time constant picked from the
//! token count) per cube along the grid's `y` axis; more tokens launch more tiles, each of which
//! re-reads the weight. Each unit keeps `TT` accumulators, so every weight loaded serves `TT`
//! tokens. Partial sums are combined by a tree reduction in shared memory (no plane/warp
//! intrinsics: wgpu does not expose them on CPU adapters, where these kernels are tested).
//!
//! - **N:M** (mirrors [`crate::formats::NmWeight`]): values exactly as on the host, output by
//!   output (`values[j·S + q]`, `S = (d_in / m)·(m - n)` slots per output); positions as the
//!   host's packed `b`-bit fields (`b` = 2, 4, 8) regrouped into little-endian `u32` words per
//!   output (`pos[j·P + q·b / 32]`, bit `q·b mod 32`, `P = ceil(S·b / 32)`). Slot `q` of output
//!   `j` is input `i = (q / k)·m + field(q)` with `k = m - n`. A cube holds 8 outputs × 32
//!   lanes; lane `l` of output `j` walks slots `l, l + 32, …`, so a warp's value loads are
//!   contiguous and its position loads hit two words. 2:4 reads 4.25 bytes per 4 inputs
//!   instead of 16.
//! - **CSR** (mirrors [`crate::formats::CsrWeight`], also built from a
//!   [`crate::formats::BitmaskWeight`]): `row_ptr: u32 [d_out + 1]`, `values: f32 [nnz]` and
//!   input indices either as `u16` pairs packed in `u32` words (`d_in ≤ 65536`; entry `e` is
//!   half `e mod 2` of word `e / 2`) or as plain `u32`. Same 8 outputs × 32 lanes per cube,
//!   lanes striding over the output's entries `row_ptr[j] + l, + 32, …`.
//! - **Dense** (the baseline of the same style): `W` as uploaded, `[d_in, d_out]` row-major. A
//!   cube holds 32 consecutive outputs × 8 input splits; unit `(j, s)` sums inputs
//!   `s, s + 8, …`, so a warp reads 32 consecutive weights of one input row.
//!
//! Sums run in a different order than on the host; results agree to rounding. The tests
//! (`cargo test -p ressa-sparse --features wgpu gpu`) check every kernel against a dense `f64`
//! product of the same masked weight to `1e-5` relative to `Σ_i |x[t, i]·W[i, j]|`, on wgpu
//! (which also runs on the CPU through Mesa's lavapipe or llvmpipe). Speed is measured by
//! `benches/gpu_kernels.rs`.

use std::marker::PhantomData;

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::error::SparseError;
use crate::formats::{BitmaskWeight, CsrIndices, CsrWeight, NmWeight, SparseFormat};

/// Lanes sharing one output in the sparse kernels (one warp on NVIDIA).
const LANES: u32 = 32;
/// Outputs per cube in the sparse kernels.
const SPARSE_COLS: u32 = 8;
/// Outputs per cube in the dense kernel.
const DENSE_COLS: u32 = 32;
/// Input splits per output in the dense kernel.
const DENSE_SPLITS: u32 = 8;

/// Adds up the `red_n` partial sums of each (output, token) through shared memory and lets
/// unit `red == 0` store them: `acc` holds unit `(red, slot)`'s partial sums for the `tt`
/// tokens of tile `CUBE_POS_Y`, `col` is the unit's output. Every unit of the cube must call it.
#[cube]
#[allow(clippy::too_many_arguments)]
fn reduce_store(
    acc: &Array<f32>,
    y: &mut Array<f32>,
    red: u32,
    slot: u32,
    col: u32,
    tokens: u32,
    d_out: u32,
    #[comptime] red_n: u32,
    #[comptime] slot_n: u32,
    #[comptime] tt: u32,
) {
    let mut shared = SharedMemory::<f32>::new(comptime!((red_n * slot_n * tt) as usize));
    #[unroll]
    for t in 0..tt {
        shared[(((t * slot_n + slot) * red_n) + red) as usize] = acc[t as usize];
    }
    sync_cube();
    let mut active = red_n.runtime();
    while active > 1 {
        active /= 2;
        if red < active {
            #[unroll]
            for t in 0..tt {
                let base = (t * slot_n + slot) * red_n;
                let other = shared[(base + red + active) as usize];
                shared[(base + red) as usize] += other;
            }
        }
        sync_cube();
    }
    if red == 0 && col < d_out {
        let t0 = CUBE_POS_Y * tt;
        #[unroll]
        for t in 0..tt {
            if t0 + t < tokens {
                y[((t0 + t) * d_out + col) as usize] =
                    shared[((t * slot_n + slot) * red_n) as usize];
            }
        }
    }
}

/// Row offsets into `x` of the tile's `tt` tokens; tokens past the end repeat the last row
/// (their sums are computed and never stored).
#[cube]
fn token_offsets(tokens: u32, d_in: u32, #[comptime] tt: u32) -> Array<u32> {
    let mut xo = Array::<u32>::new(comptime!(tt as usize));
    let t0 = CUBE_POS_Y * tt;
    #[unroll]
    for t in 0..tt {
        let tok = t0 + t;
        xo[t as usize] = select(tok < tokens, tok, tokens - 1) * d_in;
    }
    xo
}

/// N:M product: one output per `UNIT_POS_Y`, `LANES` lanes (`UNIT_POS_X`) over its slots.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn nm_kernel(
    x: &Array<f32>,
    values: &Array<f32>,
    pos: &Array<u32>,
    y: &mut Array<f32>,
    tokens: u32,
    d_in: u32,
    d_out: u32,
    slots: u32,
    words: u32,
    #[comptime] m: u32,
    #[comptime] k: u32,
    #[comptime] bits: u32,
    #[comptime] tt: u32,
) {
    let lane = UNIT_POS_X;
    let col = CUBE_POS_X * SPARSE_COLS + UNIT_POS_Y;
    let xo = token_offsets(tokens, d_in, tt);
    let mut acc = Array::<f32>::new(comptime!(tt as usize));
    #[unroll]
    for t in 0..tt {
        acc[t as usize] = 0.0;
    }
    if col < d_out {
        let per_word = comptime!(32 / bits);
        let field = comptime!((1u32 << bits) - 1);
        let vbase = col * slots;
        let pbase = col * words;
        for q in range_stepped(lane, slots, LANES) {
            let word = pos[(pbase + q / per_word) as usize];
            let i = (q / k) * m + ((word >> ((q % per_word) * bits)) & field);
            let v = values[(vbase + q) as usize];
            #[unroll]
            for t in 0..tt {
                acc[t as usize] += v * x[(xo[t as usize] + i) as usize];
            }
        }
    }
    reduce_store(
        &acc,
        y,
        lane,
        UNIT_POS_Y,
        col,
        tokens,
        d_out,
        LANES,
        SPARSE_COLS,
        tt,
    );
}

/// CSR product: one output per `UNIT_POS_Y`, `LANES` lanes (`UNIT_POS_X`) over its entries.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn csr_kernel(
    x: &Array<f32>,
    row_ptr: &Array<u32>,
    indices: &Array<u32>,
    values: &Array<f32>,
    y: &mut Array<f32>,
    tokens: u32,
    d_in: u32,
    d_out: u32,
    #[comptime] wide: bool,
    #[comptime] tt: u32,
) {
    let lane = UNIT_POS_X;
    let col = CUBE_POS_X * SPARSE_COLS + UNIT_POS_Y;
    let xo = token_offsets(tokens, d_in, tt);
    let mut acc = Array::<f32>::new(comptime!(tt as usize));
    #[unroll]
    for t in 0..tt {
        acc[t as usize] = 0.0;
    }
    if col < d_out {
        let start = row_ptr[col as usize];
        let end = row_ptr[(col + 1) as usize];
        for e in range_stepped(start + lane, end, LANES) {
            let i = if comptime!(wide) {
                indices[e as usize]
            } else {
                (indices[(e / 2) as usize] >> ((e % 2) * 16)) & 0xFFFF
            };
            let v = values[e as usize];
            #[unroll]
            for t in 0..tt {
                acc[t as usize] += v * x[(xo[t as usize] + i) as usize];
            }
        }
    }
    reduce_store(
        &acc,
        y,
        lane,
        UNIT_POS_Y,
        col,
        tokens,
        d_out,
        LANES,
        SPARSE_COLS,
        tt,
    );
}

/// Dense product: one output per `UNIT_POS_X`, `DENSE_SPLITS` units (`UNIT_POS_Y`) over its
/// inputs.
#[cube(launch_unchecked)]
fn dense_kernel(
    x: &Array<f32>,
    w: &Array<f32>,
    y: &mut Array<f32>,
    tokens: u32,
    d_in: u32,
    d_out: u32,
    #[comptime] tt: u32,
) {
    let split = UNIT_POS_Y;
    let col = CUBE_POS_X * DENSE_COLS + UNIT_POS_X;
    let xo = token_offsets(tokens, d_in, tt);
    let mut acc = Array::<f32>::new(comptime!(tt as usize));
    #[unroll]
    for t in 0..tt {
        acc[t as usize] = 0.0;
    }
    if col < d_out {
        for i in range_stepped(split, d_in, DENSE_SPLITS) {
            let v = w[(i * d_out + col) as usize];
            #[unroll]
            for t in 0..tt {
                acc[t as usize] += v * x[(xo[t as usize] + i) as usize];
            }
        }
    }
    reduce_store(
        &acc,
        y,
        split,
        UNIT_POS_X,
        col,
        tokens,
        d_out,
        DENSE_SPLITS,
        DENSE_COLS,
        tt,
    );
}

/// A row-major `f32` matrix on a device.
pub struct GpuMatrix<R: Runtime> {
    handle: Handle,
    rows: usize,
    cols: usize,
    _runtime: PhantomData<R>,
}

impl<R: Runtime> GpuMatrix<R> {
    /// Uploads a row-major `[rows, cols]` buffer.
    pub fn upload(
        client: &ComputeClient<R>,
        data: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<Self, SparseError> {
        let len = checked_len(rows, cols, "matrix")?;
        if data.len() != len {
            return Err(SparseError::DimMismatch {
                what: "matrix = [rows, cols]",
                expected: len,
                got: data.len(),
            });
        }
        Ok(Self {
            handle: upload_f32(client, data),
            rows,
            cols,
            _runtime: PhantomData,
        })
    }

    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The device buffer (at least 4 bytes, `rows · cols` floats used).
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Copies the matrix back to the host (waits for the kernels writing it).
    pub fn read(&self, client: &ComputeClient<R>) -> Result<Vec<f32>, SparseError> {
        let len = self.rows * self.cols;
        if len == 0 {
            return Ok(Vec::new());
        }
        let bytes = client.read_one(self.handle.clone()).map_err(|e| {
            SparseError::Gpu(format!(
                "reading a [{}, {}] matrix: {e:?}",
                self.rows, self.cols
            ))
        })?;
        let all = f32::from_bytes(&bytes);
        all.get(..len).map(<[f32]>::to_vec).ok_or_else(|| {
            SparseError::Gpu(format!(
                "read {} floats for a [{}, {}] matrix",
                all.len(),
                self.rows,
                self.cols
            ))
        })
    }
}

/// Which kernel a [`GpuSparseWeight`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuKernel {
    /// Dense weight (zeros stored), the baseline.
    Dense,
    /// Packed N:M.
    Nm,
    /// CSR over outputs (from [`CsrWeight`] or [`BitmaskWeight`]).
    Csr,
}

enum Layout {
    Dense {
        w: Handle,
    },
    Nm {
        values: Handle,
        pos: Handle,
        m: u32,
        k: u32,
        bits: u32,
        slots: u32,
        words: u32,
    },
    Csr {
        row_ptr: Handle,
        indices: Handle,
        values: Handle,
        nnz: usize,
        words: usize,
        wide: bool,
    },
}

/// A weight uploaded to a device in one of the kernel layouts (see the module docs).
pub struct GpuSparseWeight<R: Runtime> {
    d_in: usize,
    d_out: usize,
    bytes: usize,
    layout: Layout,
    _runtime: PhantomData<R>,
}

impl<R: Runtime> GpuSparseWeight<R> {
    /// Uploads a dense row-major `[d_in, d_out]` weight (pruned entries stored as zeros).
    pub fn from_dense(
        client: &ComputeClient<R>,
        w: &[f32],
        d_in: usize,
        d_out: usize,
    ) -> Result<Self, SparseError> {
        crate::formats::check_dense(w, d_in, d_out)?;
        check_u32(w.len(), "dense weight entries")?;
        Ok(Self::new(
            d_in,
            d_out,
            w.len() * 4,
            Layout::Dense {
                w: upload_f32(client, w),
            },
        ))
    }

    /// Uploads a packed N:M weight.
    pub fn from_nm(client: &ComputeClient<R>, w: &NmWeight) -> Result<Self, SparseError> {
        let (d_in, d_out) = w.shape();
        let (n, m) = w.n_m();
        let (bits, slots) = (w.index_bits(), w.slots_per_row());
        let words = (slots * bits).div_ceil(32);
        let row_bytes = w.row_bytes();
        check_u32(d_out.saturating_mul(slots.max(words)), "N:M slots")?;
        check_u32(d_in, "d_in")?;
        // the host's per-output bytes regrouped into little-endian u32 words per output
        let mut pos = vec![0u32; d_out * words];
        for (j, row) in w
            .indices()
            .chunks_exact(row_bytes.max(1))
            .enumerate()
            .take(d_out)
        {
            for (b, &byte) in row.iter().enumerate() {
                pos[j * words + b / 4] |= u32::from(byte) << (8 * (b % 4));
            }
        }
        Ok(Self::new(
            d_in,
            d_out,
            w.values().len() * 4 + pos.len() * 4,
            Layout::Nm {
                values: upload_f32(client, w.values()),
                pos: upload_u32(client, &pos),
                m: m as u32,
                k: (m - n) as u32,
                bits: bits as u32,
                slots: slots as u32,
                words: words as u32,
            },
        ))
    }

    /// Uploads a CSR weight.
    pub fn from_csr(client: &ComputeClient<R>, w: &CsrWeight) -> Result<Self, SparseError> {
        let (d_in, d_out) = w.shape();
        let idx: Vec<u32> = match w.indices() {
            CsrIndices::U16(v) => v.iter().map(|&i| u32::from(i)).collect(),
            CsrIndices::U32(v) => v.clone(),
        };
        Self::csr_parts(client, d_in, d_out, w.row_ptr(), &idx, w.values())
    }

    /// Uploads a compressed-tensors bitmask weight in the CSR layout (its row offsets and
    /// values as they are, input indices read from the bitmask).
    pub fn from_bitmask(client: &ComputeClient<R>, w: &BitmaskWeight) -> Result<Self, SparseError> {
        let (d_in, d_out) = w.shape();
        let row_len = d_in.div_ceil(8);
        let mut idx = Vec::with_capacity(w.nnz());
        for row in w.bitmask().chunks_exact(row_len.max(1)).take(d_out) {
            for (b, &byte) in row.iter().enumerate() {
                let mut bits = byte;
                while bits != 0 {
                    idx.push((b * 8 + bits.trailing_zeros() as usize) as u32);
                    bits &= bits - 1;
                }
            }
        }
        Self::csr_parts(client, d_in, d_out, w.row_ptr(), &idx, w.compressed())
    }

    fn csr_parts(
        client: &ComputeClient<R>,
        d_in: usize,
        d_out: usize,
        row_ptr: &[usize],
        idx: &[u32],
        values: &[f32],
    ) -> Result<Self, SparseError> {
        check_u32(values.len(), "stored entries")?;
        check_u32(d_in, "d_in")?;
        if idx.len() != values.len() || row_ptr.len() != d_out + 1 {
            return Err(SparseError::Gpu(format!(
                "CSR parts: {} indices, {} values, {} row pointers for d_out = {d_out}",
                idx.len(),
                values.len(),
                row_ptr.len()
            )));
        }
        let rp: Vec<u32> = row_ptr.iter().map(|&p| p as u32).collect();
        let wide = d_in > 1 << 16;
        let packed: Vec<u32> = if wide {
            idx.to_vec()
        } else {
            idx.chunks(2)
                .map(|c| c[0] | c.get(1).map_or(0, |&h| h << 16))
                .collect()
        };
        Ok(Self::new(
            d_in,
            d_out,
            values.len() * 4 + packed.len() * 4 + rp.len() * 4,
            Layout::Csr {
                row_ptr: upload_u32(client, &rp),
                indices: upload_u32(client, &packed),
                values: upload_f32(client, values),
                nnz: values.len(),
                words: packed.len(),
                wide,
            },
        ))
    }

    fn new(d_in: usize, d_out: usize, bytes: usize, layout: Layout) -> Self {
        Self {
            d_in,
            d_out,
            bytes,
            layout,
            _runtime: PhantomData,
        }
    }

    /// `(d_in, d_out)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.d_in, self.d_out)
    }

    /// The kernel [`Self::matmul`] runs.
    pub fn kernel(&self) -> GpuKernel {
        match self.layout {
            Layout::Dense { .. } => GpuKernel::Dense,
            Layout::Nm { .. } => GpuKernel::Nm,
            Layout::Csr { .. } => GpuKernel::Csr,
        }
    }

    /// Bytes of the device buffers holding the weight.
    pub fn storage_bytes(&self) -> usize {
        self.bytes
    }

    /// `y = x · W` for `x` `[tokens, d_in]`; returns `y` `[tokens, d_out]` on the same device.
    /// Only queues the kernel; [`GpuMatrix::read`] (or `client.sync()`) waits for it. `x` and
    /// the weight must have been uploaded through `client`'s device.
    pub fn matmul(
        &self,
        client: &ComputeClient<R>,
        x: &GpuMatrix<R>,
    ) -> Result<GpuMatrix<R>, SparseError> {
        let (tokens, d_in) = x.shape();
        if d_in != self.d_in {
            return Err(SparseError::DimMismatch {
                what: "x = [tokens, d_in] columns",
                expected: self.d_in,
                got: d_in,
            });
        }
        let len = checked_len(tokens, self.d_out, "y = [tokens, d_out]")?;
        check_u32(len, "y = [tokens, d_out] entries")?;
        check_u32(tokens.saturating_mul(d_in.max(1)), "x entries")?;
        let y = GpuMatrix {
            handle: client.empty(len.max(1) * 4),
            rows: tokens,
            cols: self.d_out,
            _runtime: PhantomData,
        };
        if len == 0 {
            return Ok(y);
        }
        let tt = tile_for(tokens);
        let tiles = tokens.div_ceil(tt as usize) as u32;
        let per_cube = match self.layout {
            Layout::Dense { .. } => DENSE_COLS,
            _ => SPARSE_COLS,
        };
        let cubes_x = self.d_out.div_ceil(per_cube as usize);
        let max = client.properties().hardware.max_cube_count;
        if cubes_x > max.0 as usize || tiles > max.1 {
            return Err(SparseError::Gpu(format!(
                "grid {cubes_x} x {tiles} cubes exceeds the device limit {} x {}",
                max.0, max.1
            )));
        }
        let count = CubeCount::Static(cubes_x as u32, tiles, 1);
        let (t32, din32, dout32) = (tokens as u32, self.d_in as u32, self.d_out as u32);
        let xa = || unsafe { ArrayArg::from_raw_parts(x.handle.clone(), (tokens * d_in).max(1)) };
        let ya = unsafe { ArrayArg::from_raw_parts(y.handle.clone(), len) };
        // SAFETY (all launches): every index the kernels form is below the lengths passed here:
        // outputs `col < d_out` and tokens `< tokens` are checked in the kernels, inputs come from
        // the validated packed formats (`i < d_in`), and slot/entry ranges from their own sizes.
        match &self.layout {
            Layout::Dense { w } => unsafe {
                dense_kernel::launch_unchecked::<R>(
                    client,
                    count,
                    CubeDim::new_2d(DENSE_COLS, DENSE_SPLITS),
                    xa(),
                    ArrayArg::from_raw_parts(w.clone(), (self.d_in * self.d_out).max(1)),
                    ya,
                    t32,
                    din32,
                    dout32,
                    tt,
                );
            },
            Layout::Nm {
                values,
                pos,
                m,
                k,
                bits,
                slots,
                words,
            } => unsafe {
                let n_vals = (*slots as usize * self.d_out).max(1);
                let n_pos = (*words as usize * self.d_out).max(1);
                nm_kernel::launch_unchecked::<R>(
                    client,
                    count,
                    CubeDim::new_2d(LANES, SPARSE_COLS),
                    xa(),
                    ArrayArg::from_raw_parts(values.clone(), n_vals),
                    ArrayArg::from_raw_parts(pos.clone(), n_pos),
                    ya,
                    t32,
                    din32,
                    dout32,
                    *slots,
                    *words,
                    *m,
                    *k,
                    *bits,
                    tt,
                );
            },
            Layout::Csr {
                row_ptr,
                indices,
                values,
                nnz,
                words,
                wide,
            } => unsafe {
                csr_kernel::launch_unchecked::<R>(
                    client,
                    count,
                    CubeDim::new_2d(LANES, SPARSE_COLS),
                    xa(),
                    ArrayArg::from_raw_parts(row_ptr.clone(), self.d_out + 1),
                    ArrayArg::from_raw_parts(indices.clone(), (*words).max(1)),
                    ArrayArg::from_raw_parts(values.clone(), (*nnz).max(1)),
                    ya,
                    t32,
                    din32,
                    dout32,
                    *wide,
                    tt,
                );
            },
        }
        Ok(y)
    }
}

/// Token tile for a token count: 1, 2, 4, or 8 (larger counts use several tiles of 8).
fn tile_for(tokens: usize) -> u32 {
    match tokens {
        0 | 1 => 1,
        2 => 2,
        3 | 4 => 4,
        _ => 8,
    }
}

fn checked_len(rows: usize, cols: usize, what: &'static str) -> Result<usize, SparseError> {
    rows.checked_mul(cols).ok_or(SparseError::DimMismatch {
        what,
        expected: usize::MAX,
        got: 0,
    })
}

/// The kernels address with `u32`.
fn check_u32(n: usize, what: &str) -> Result<(), SparseError> {
    if n >= u32::MAX as usize {
        return Err(SparseError::Gpu(format!(
            "{what}: {n} does not fit the kernels' 32-bit indexing"
        )));
    }
    Ok(())
}

/// Device buffers are at least 4 bytes (empty bindings are not valid on every backend).
fn upload_f32<R: Runtime>(client: &ComputeClient<R>, data: &[f32]) -> Handle {
    if data.is_empty() {
        client.create_from_slice(f32::as_bytes(&[0.0]))
    } else {
        client.create_from_slice(f32::as_bytes(data))
    }
}

fn upload_u32<R: Runtime>(client: &ComputeClient<R>, data: &[u32]) -> Handle {
    if data.is_empty() {
        client.create_from_slice(u32::as_bytes(&[0]))
    } else {
        client.create_from_slice(u32::as_bytes(data))
    }
}

/// A client on the default wgpu device, preferring Vulkan (lavapipe on a machine without a GPU)
/// and falling back to OpenGL (llvmpipe). Errors, instead of panicking inside cubecl, when no
/// adapter exists.
#[cfg(feature = "wgpu")]
pub fn wgpu_client() -> Result<ComputeClient<cubecl::wgpu::WgpuRuntime>, SparseError> {
    use cubecl::wgpu::{OpenGl, RuntimeOptions, WgpuDevice, WgpuRuntime, init_setup};
    use std::sync::OnceLock;

    static DEVICE: OnceLock<Result<WgpuDevice, String>> = OnceLock::new();
    let device = DEVICE.get_or_init(|| {
        let found = |backends: wgpu::Backends| {
            let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
                backends,
                ..wgpu::InstanceDescriptor::new_without_display_handle()
            });
            !cubecl::future::block_on(instance.enumerate_adapters(backends)).is_empty()
        };
        if found(wgpu::Backends::VULKAN) {
            // cubecl's default graphics API on Linux and Windows
            Ok(WgpuDevice::DefaultDevice)
        } else if found(wgpu::Backends::GL) {
            init_setup::<OpenGl>(&WgpuDevice::DefaultDevice, RuntimeOptions::default());
            Ok(WgpuDevice::DefaultDevice)
        } else {
            Err(
                "no Vulkan or OpenGL adapter for wgpu (without a GPU, install Mesa: \
                 mesa-vulkan-drivers libvulkan1)"
                    .to_string(),
            )
        }
    });
    match device {
        Ok(d) => Ok(WgpuRuntime::client(d)),
        Err(e) => Err(SparseError::Gpu(e.clone())),
    }
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use super::*;
    use crate::formats::test_util::{Lcg, masked_weight, nm_weight};
    use crate::kernels::matmul_dense;
    use crate::kernels::test_ref::{assert_close, reference};
    use crate::mask::Mask;
    use crate::pattern::SparsityPattern;
    use cubecl::wgpu::WgpuRuntime;

    type Client = ComputeClient<WgpuRuntime>;

    /// The wgpu client, or `None` (with the reason printed) when there is no adapter; with
    /// `RESSA_REQUIRE_GPU_RUNTIME=1` a missing adapter fails the test.
    fn client() -> Option<Client> {
        match wgpu_client() {
            Ok(c) => {
                static SHOWN: std::sync::Once = std::sync::Once::new();
                SHOWN.call_once(|| eprintln!("GPU kernel tests on wgpu {:?}", c.info()));
                Some(c)
            }
            Err(e) => {
                assert!(
                    std::env::var("RESSA_REQUIRE_GPU_RUNTIME").as_deref() != Ok("1"),
                    "RESSA_REQUIRE_GPU_RUNTIME=1 but {e}"
                );
                eprintln!("skipping GPU kernel test: {e}");
                None
            }
        }
    }

    /// The f64 dense reference of `x · W` and the CPU dense kernel's result (with the same
    /// error scale `Σ_i |x[t, i]·W[i, j]|`).
    struct Expected {
        f64_ref: (Vec<f64>, Vec<f64>),
        cpu: (Vec<f64>, Vec<f64>),
    }

    fn expected(x: &[f32], tokens: usize, w: &[f32], d_in: usize, d_out: usize) -> Expected {
        let f64_ref = reference(x, tokens, w, d_in, d_out);
        let cpu = matmul_dense(x, tokens, w, d_in, d_out).unwrap();
        let cpu = (
            cpu.iter().map(|&v| f64::from(v)).collect(),
            f64_ref.1.clone(),
        );
        Expected { f64_ref, cpu }
    }

    /// A GPU result within `1e-5 · Σ|x·w|` of both the f64 reference and the CPU dense kernel.
    fn check(y: &[f32], e: &Expected, what: &str) {
        assert_close(y, &e.f64_ref, &format!("{what} vs f64 reference"));
        assert_close(y, &e.cpu, &format!("{what} vs CPU matmul_dense"));
    }

    fn random_x(rng: &mut Lcg, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.unit()).collect()
    }

    fn product(c: &Client, w: &GpuSparseWeight<WgpuRuntime>, x: &[f32], tokens: usize) -> Vec<f32> {
        let xm = GpuMatrix::upload(c, x, tokens, w.shape().0).unwrap();
        let y = w.matmul(c, &xm).unwrap();
        assert_eq!(y.shape(), (tokens, w.shape().1));
        y.read(c).unwrap()
    }

    /// CSR, bitmask-as-CSR and dense kernels on one masked weight against the f64 reference.
    fn check_unstructured(c: &Client, seed: u64, d_in: usize, d_out: usize, tokens: usize, s: f64) {
        let mut rng = Lcg(seed);
        let (w, mask) = masked_weight(&mut rng, d_in, d_out, s);
        check_weight(c, &mut rng, &w, &mask, tokens, &format!("sparsity {s}"));
    }

    fn check_weight(c: &Client, rng: &mut Lcg, w: &[f32], mask: &Mask, tokens: usize, what: &str) {
        let (d_in, d_out) = mask.shape();
        let x = random_x(rng, tokens * d_in);
        let r = expected(&x, tokens, w, d_in, d_out);
        let what = format!("{d_in}x{d_out}, {tokens} tokens, {what}");
        let csr = GpuSparseWeight::from_csr(c, &CsrWeight::from_masked(w, mask).unwrap()).unwrap();
        assert_eq!(csr.kernel(), GpuKernel::Csr);
        check(&product(c, &csr, &x, tokens), &r, &format!("csr {what}"));
        let bm = BitmaskWeight::from_masked(w, mask).unwrap();
        let bm = GpuSparseWeight::from_bitmask(c, &bm).unwrap();
        check(&product(c, &bm, &x, tokens), &r, &format!("bitmask {what}"));
        let dense = GpuSparseWeight::from_dense(c, w, d_in, d_out).unwrap();
        check(
            &product(c, &dense, &x, tokens),
            &r,
            &format!("dense {what}"),
        );
    }

    fn check_nm(
        c: &Client,
        seed: u64,
        groups: usize,
        d_out: usize,
        tokens: usize,
        n: usize,
        m: usize,
    ) {
        let mut rng = Lcg(seed);
        let d_in = groups * m;
        let (w, mask) = nm_weight(&mut rng, d_in, d_out, n, m);
        let x = random_x(&mut rng, tokens * d_in);
        let r = expected(&x, tokens, &w, d_in, d_out);
        let p = SparsityPattern::n_m(n, m).unwrap();
        let nm =
            GpuSparseWeight::from_nm(c, &NmWeight::from_masked(&w, &mask, p).unwrap()).unwrap();
        assert_eq!(nm.kernel(), GpuKernel::Nm);
        let what = format!("{n}:{m} {d_in}x{d_out}, {tokens} tokens");
        check(&product(c, &nm, &x, tokens), &r, &what);
    }

    #[test]
    fn nm_kernel_matches_dense() {
        let Some(c) = client() else { return };
        // d_in never a multiple of the 32 lanes or of a u32 word of positions; odd d_out
        for (n, m) in [(2, 4), (4, 8), (1, 4), (3, 8), (1, 2), (5, 16)] {
            for (groups, d_out) in [(1, 1), (37, 5), (19, 33), (75, 9)] {
                for tokens in [1, 3, 8, 11] {
                    check_nm(
                        &c,
                        (groups * 131 + tokens) as u64,
                        groups,
                        d_out,
                        tokens,
                        n,
                        m,
                    );
                }
            }
        }
    }

    #[test]
    fn unstructured_kernels_match_dense() {
        let Some(c) = client() else { return };
        for (k, &(d_in, d_out)) in [(1, 1), (37, 5), (150, 33), (300, 77)].iter().enumerate() {
            for tokens in [1, 3, 8, 11] {
                for s in [0.0, 0.5, 0.7, 0.9, 1.0] {
                    check_unstructured(&c, (k * 17 + tokens) as u64, d_in, d_out, tokens, s);
                }
            }
        }
    }

    #[test]
    fn zero_column_and_empty_row() {
        let Some(c) = client() else { return };
        let mut rng = Lcg(3);
        let (d_in, d_out) = (72, 9);
        // 2:4 weight; output 4 pruned entirely (an all-zero column, an empty CSR row) and
        // input 10 used by no output (an empty row of W)
        let (mut w, mask) = nm_weight(&mut rng, d_in, d_out, 2, 4);
        let mut keep = mask.to_bools();
        for i in 0..d_in {
            keep[i * d_out + 4] = false;
        }
        for j in 0..d_out {
            keep[10 * d_out + j] = false;
        }
        let mask = Mask::from_bools(d_in, d_out, &keep).unwrap();
        mask.apply(&mut w).unwrap();
        for tokens in [1, 3, 8] {
            check_weight(&c, &mut rng, &w, &mask, tokens, "zero column and row");
            let x = random_x(&mut rng, tokens * d_in);
            let r = expected(&x, tokens, &w, d_in, d_out);
            // zero slots are padded in for the pruned groups
            let nm = NmWeight::from_dense(&w, d_in, d_out, SparsityPattern::TWO_FOUR).unwrap();
            let y = product(&c, &GpuSparseWeight::from_nm(&c, &nm).unwrap(), &x, tokens);
            check(&y, &r, "2:4 zero column and row");
            for t in 0..tokens {
                assert_eq!(y[t * d_out + 4], 0.0);
            }
        }
    }

    #[test]
    fn wide_layers_use_u32_indices() {
        let Some(c) = client() else { return };
        for d_in in [(1 << 16) - 1, (1 << 16) + 5] {
            for tokens in [1, 2] {
                check_unstructured(&c, d_in as u64, d_in, 3, tokens, 0.9);
            }
        }
    }

    #[test]
    fn empty_operands_and_bad_shapes() {
        let Some(c) = client() else { return };
        let w = vec![1.0f32; 6];
        let csr = GpuSparseWeight::from_csr(&c, &CsrWeight::from_dense(&w, 2, 3).unwrap()).unwrap();
        // no tokens
        assert!(product(&c, &csr, &[], 0).is_empty());
        // d_in = 0: y is all zeros
        let empty =
            GpuSparseWeight::from_csr(&c, &CsrWeight::from_dense(&[], 0, 3).unwrap()).unwrap();
        assert_eq!(product(&c, &empty, &[], 2), vec![0.0; 6]);
        let empty = GpuSparseWeight::from_dense(&c, &[], 0, 3).unwrap();
        assert_eq!(product(&c, &empty, &[], 2), vec![0.0; 6]);
        // d_out = 0
        let none = GpuSparseWeight::from_dense(&c, &[], 4, 0).unwrap();
        assert!(product(&c, &none, &[1.0; 8], 2).is_empty());
        // all pruned
        let zeros = CsrWeight::from_masked(&w, &Mask::zeros(2, 3).unwrap()).unwrap();
        let zeros = GpuSparseWeight::from_csr(&c, &zeros).unwrap();
        assert_eq!(product(&c, &zeros, &[1.0, 2.0], 1), vec![0.0; 3]);
        // wrong shapes
        let x3 = GpuMatrix::upload(&c, &[1.0; 3], 1, 3).unwrap();
        let e = csr.matmul(&c, &x3).err().unwrap();
        assert!(
            matches!(
                e,
                SparseError::DimMismatch {
                    expected: 2,
                    got: 3,
                    ..
                }
            ),
            "{e}"
        );
        assert!(GpuMatrix::<WgpuRuntime>::upload(&c, &[1.0; 3], 2, 2).is_err());
        assert!(GpuMatrix::<WgpuRuntime>::upload(&c, &[], usize::MAX, 2).is_err());
        assert!(GpuSparseWeight::from_dense(&c, &w, 3, 3).is_err());
    }
}
