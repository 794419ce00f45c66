//! Dense `f32` products on strided host matrices: `C (+)= A · B`, multi-threaded.
//!
//! The models' dense path on the CPU backends runs through here (`ressa-models`' `ops`): faer's
//! gemm picks its SIMD kernels at run time (AVX-512 where the CPU has it, AVX2/FMA otherwise),
//! and operands are read through their strides, so a transposed view (`Wᵀ` for a linear's input
//! gradient, `xᵀ` for its weight gradient) is never copied.
//!
//! Work is split over rayon into column blocks of `C` (rows for tall-and-narrow products), each
//! one sequential faer call followed by `vzeroupper` on the thread that ran it (see
//! [`clear_upper_state`]); products below [`SERIAL_WORK`] multiply-adds stay on the calling
//! thread, where a fork/join costs more than it saves.

use rayon::prelude::*;

/// Below this many multiply-adds a product runs on the calling thread.
pub const SERIAL_WORK: usize = 1 << 18;

/// A read-only strided matrix: element `(i, j)` is `data[offset + i·row_stride + j·col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    data: &'a [f32],
    offset: usize,
    rows: usize,
    cols: usize,
    row_stride: isize,
    col_stride: isize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows × cols` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "row-major matrix: length vs shape");
        Self::strided(data, 0, rows, cols, cols as isize, 1)
    }

    /// A view with explicit strides (in elements, non-negative); panics if an element would
    /// fall outside `data`.
    pub fn strided(
        data: &'a [f32],
        offset: usize,
        rows: usize,
        cols: usize,
        row_stride: isize,
        col_stride: isize,
    ) -> Self {
        assert!(row_stride >= 0 && col_stride >= 0, "negative strides");
        if rows > 0 && cols > 0 {
            let last = offset + (rows - 1) * row_stride as usize + (cols - 1) * col_stride as usize;
            assert!(last < data.len(), "strided matrix reaches past its buffer");
        }
        Self {
            data,
            offset,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The transpose (a view; nothing is copied).
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    fn faer(&self) -> faer::MatRef<'a, f32> {
        if self.rows == 0 || self.cols == 0 {
            return faer::MatRef::from_row_major_slice(&[], self.rows, self.cols);
        }
        // SAFETY: `strided` checked that every element (i, j) with i < rows, j < cols lies
        // inside `data`, which outlives 'a; strides are non-negative.
        unsafe {
            faer::MatRef::from_raw_parts(
                self.data.as_ptr().add(self.offset),
                self.rows,
                self.cols,
                self.row_stride,
                self.col_stride,
            )
        }
    }
}

/// `C = A · B` (`accumulate = false`) or `C += A · B`, `C` row-major `[A.rows, B.cols]`.
pub fn gemm(c: &mut [f32], a: MatRef<'_>, b: MatRef<'_>, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "gemm: inner dimensions differ");
    assert_eq!(c.len(), m * n, "gemm: output length vs shape");
    if c.is_empty() {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    // one row times a row-major matrix (decoding: one token through a linear): the plain
    // loop streams the weight rows faster than faer's gemv (0.92 vs 1.2 ms, 2048×5120)
    if m == 1 && a.col_stride == 1 && b.col_stride == 1 && b.row_stride as usize == n {
        let x = &a.data[a.offset..a.offset + k];
        let w = &b.data[b.offset..b.offset + k * n];
        if accumulate {
            let mut y = vec![0.0f32; n];
            super::dense::matmul_dense_into(x, 1, w, k, n, &mut y).expect("sizes checked");
            c.iter_mut().zip(&y).for_each(|(c, y)| *c += y);
        } else {
            super::dense::matmul_dense_into(x, 1, w, k, n, c).expect("sizes checked");
        }
        return;
    }
    let cm = faer::MatMut::from_row_major_slice_mut(c, m, n);
    let work = m.saturating_mul(n).saturating_mul(k);
    let threads = rayon::current_num_threads();
    if work < SERIAL_WORK || threads == 1 {
        seq(cm, a.faer(), b.faer(), accumulate);
        return;
    }
    // two blocks per thread for balance; the wider side is split
    let parts = 2 * threads;
    if n >= m {
        let min_cols = (n / parts).max(64);
        split_cols(cm, a.faer(), b.faer(), accumulate, min_cols);
    } else {
        let min_rows = (m / parts).max(16);
        split_rows(cm, a.faer(), b.faer(), accumulate, min_rows);
    }
}

/// `C_i = A_i · B_i` (or `+=`) for a batch of independent products of equal shapes: `c` holds
/// the row-major outputs one after another; batches run in parallel, each product sequential.
pub fn gemm_batched<'a, F>(c: &mut [f32], m: usize, n: usize, operands: F, accumulate: bool)
where
    F: Fn(usize) -> (MatRef<'a>, MatRef<'a>) + Sync,
{
    let size = m * n;
    if size == 0 {
        return;
    }
    assert_eq!(c.len() % size, 0, "gemm_batched: output length vs shape");
    let batches = c.len() / size;
    if batches == 0 {
        return;
    }
    let one = |(i, ci): (usize, &mut [f32])| {
        let (a, b) = operands(i);
        assert!(
            a.rows == m && b.cols == n && a.cols == b.rows,
            "gemm_batched: shapes"
        );
        if a.cols == 0 {
            if !accumulate {
                ci.fill(0.0);
            }
            return;
        }
        let cm = faer::MatMut::from_row_major_slice_mut(ci, m, n);
        seq(cm, a.faer(), b.faer(), accumulate);
    };
    let k = operands(0).0.cols;
    let work = batches.saturating_mul(size).saturating_mul(k);
    if work < SERIAL_WORK || batches == 1 {
        if batches == 1 {
            // one product: let `gemm` split it
            let (a, b) = operands(0);
            return gemm(c, a, b, accumulate);
        }
        c.chunks_exact_mut(size).enumerate().for_each(one);
    } else {
        c.par_chunks_exact_mut(size).enumerate().for_each(one);
    }
}

fn seq(c: faer::MatMut<'_, f32>, a: faer::MatRef<'_, f32>, b: faer::MatRef<'_, f32>, acc: bool) {
    let accum = if acc {
        faer::Accum::Add
    } else {
        faer::Accum::Replace
    };
    faer::linalg::matmul::matmul(c, accum, a, b, 1.0f32, faer::Par::Seq);
    clear_upper_state();
}

fn split_cols(
    c: faer::MatMut<'_, f32>,
    a: faer::MatRef<'_, f32>,
    b: faer::MatRef<'_, f32>,
    acc: bool,
    min_cols: usize,
) {
    let n = c.ncols();
    if n <= min_cols || n < 32 {
        return seq(c, a, b, acc);
    }
    // split on a multiple of 16 outputs (whole SIMD registers)
    let mid = (n / 2).next_multiple_of(16).min(n - 1);
    let (c0, c1) = c.split_at_col_mut(mid);
    let (b0, b1) = b.split_at_col(mid);
    rayon::join(
        || split_cols(c0, a, b0, acc, min_cols),
        || split_cols(c1, a, b1, acc, min_cols),
    );
}

fn split_rows(
    c: faer::MatMut<'_, f32>,
    a: faer::MatRef<'_, f32>,
    b: faer::MatRef<'_, f32>,
    acc: bool,
    min_rows: usize,
) {
    let m = c.nrows();
    if m <= min_rows || m < 16 {
        return seq(c, a, b, acc);
    }
    let mid = (m / 2).next_multiple_of(8).min(m - 1);
    let (c0, c1) = c.split_at_row_mut(mid);
    let (a0, a1) = a.split_at_row(mid);
    rayon::join(
        || split_rows(c0, a0, b, acc, min_rows),
        || split_rows(c1, a1, b, acc, min_rows),
    );
}

/// Executes `vzeroupper` on this thread.
///
/// faer's x86 gemm kernels (`private-gemm-x86`, hand-written AVX-512 assembly) return with the
/// upper halves of the vector registers dirty. Until something clears them, every legacy-SSE
/// instruction on that thread pays for it: measured here, the (SSE2-compiled) sparse kernels
/// ran 1.6–3.3× slower for the rest of the process after one 64-token faer product (CSR, 70 %,
/// 1 and 4 tokens: 0.38 → 0.62 ms and 0.59 → 1.9 ms).
pub(crate) fn clear_upper_state() {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU supports AVX (checked just above), which is all `vzeroupper` needs;
        // it only zeroes the upper halves of the vector registers, which hold no live values
        // between Rust statements.
        unsafe { std::arch::x86_64::_mm256_zeroupper() };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::test_util::Lcg;

    /// `A·B` in f64 by the definition, read through the views.
    fn reference(a: MatRef<'_>, b: MatRef<'_>) -> Vec<f64> {
        let at = |m: &MatRef<'_>, i: usize, j: usize| {
            m.data[(m.offset as isize + i as isize * m.row_stride + j as isize * m.col_stride)
                as usize] as f64
        };
        let mut out = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                out[i * b.cols + j] = (0..a.cols).map(|p| at(&a, i, p) * at(&b, p, j)).sum();
            }
        }
        out
    }

    fn close(got: &[f32], want: &[f64], k: usize, what: &str) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            let tol = 1e-5 * (k as f64).sqrt() * (1.0 + w.abs());
            assert!((*g as f64 - w).abs() <= tol, "{what}: {g} vs {w}");
        }
    }

    #[test]
    fn strided_and_transposed_operands_split_or_not() {
        let mut rng = Lcg(3);
        // small (serial), tall (row split), wide (column split), and k = 0
        for (m, k, n) in [
            (3, 5, 4),
            (700, 64, 24),
            (24, 96, 900),
            (5, 0, 7),
            (1, 300, 1),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.unit()).collect();
            let bt: Vec<f32> = (0..n * k).map(|_| rng.unit()).collect();
            // A row-major, B given as the transpose of a row-major [n, k] (a Wᵀ-like view)
            let av = MatRef::row_major(&a, m, k);
            let bv = MatRef::row_major(&bt, n, k).t();
            let want = reference(av, bv);
            let mut c = vec![f32::NAN; m * n];
            gemm(&mut c, av, bv, false);
            close(&c, &want, k, &format!("{m}x{k}x{n}"));
            // accumulate onto ones
            let mut c = vec![1.0f32; m * n];
            gemm(&mut c, av, bv, true);
            let plus: Vec<f64> = want.iter().map(|v| v + 1.0).collect();
            close(&c, &plus, k, &format!("{m}x{k}x{n} +="));
            // B row-major (the layout of a linear's weight; one row takes the plain loop)
            let b_rm: Vec<f32> = (0..k * n).map(|_| rng.unit()).collect();
            let brv = MatRef::row_major(&b_rm, k, n);
            let want_rm = reference(av, brv);
            let mut c = vec![f32::NAN; m * n];
            gemm(&mut c, av, brv, false);
            close(&c, &want_rm, k, &format!("{m}x{k}x{n} row-major B"));
            let mut c = vec![2.0f32; m * n];
            gemm(&mut c, av, brv, true);
            let plus: Vec<f64> = want_rm.iter().map(|v| v + 2.0).collect();
            close(&c, &plus, k, &format!("{m}x{k}x{n} row-major B +="));
            // both transposed: (Bᵀ)ᵀ-style views of column-major data
            let a_cm = MatRef::row_major(&a, m, k).t(); // [k, m]
            let want_t = reference(MatRef::row_major(&bt, n, k), a_cm);
            let mut c = vec![0.0f32; n * m];
            gemm(&mut c, MatRef::row_major(&bt, n, k), a_cm, false);
            close(&c, &want_t, k, &format!("{m}x{k}x{n} transposed"));
        }
    }

    #[test]
    fn batched_products_match_one_by_one() {
        let mut rng = Lcg(5);
        let (batches, m, k, n) = (12, 17, 40, 23);
        let a: Vec<f32> = (0..batches * m * k).map(|_| rng.unit()).collect();
        let b: Vec<f32> = (0..batches * n * k).map(|_| rng.unit()).collect();
        for big in [false, true] {
            // `big` repeats the batch so the parallel path runs
            let reps = if big { 40 } else { 1 };
            let total = batches * reps;
            let mut c = vec![0.0f32; total * m * n];
            gemm_batched(
                &mut c,
                m,
                n,
                |i| {
                    let i = i % batches;
                    (
                        MatRef::strided(&a, i * m * k, m, k, k as isize, 1),
                        MatRef::strided(&b, i * n * k, k, n, 1, k as isize),
                    )
                },
                false,
            );
            for i in 0..total {
                let j = i % batches;
                let want = reference(
                    MatRef::strided(&a, j * m * k, m, k, k as isize, 1),
                    MatRef::strided(&b, j * n * k, k, n, 1, k as isize),
                );
                close(&c[i * m * n..(i + 1) * m * n], &want, k, "batch");
            }
        }
    }

    #[test]
    #[should_panic(expected = "past its buffer")]
    fn views_are_bounds_checked() {
        let data = vec![0.0f32; 10];
        MatRef::strided(&data, 2, 3, 3, 3, 1);
    }
}
