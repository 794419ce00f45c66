//! [`DenseBackend`] on burn's Flex CPU backend: host kernels on the tensors' `f32` buffers.
//!
//! - Linear layers and their gradients are one gemm each (`ressa_sparse::kernels::gemm`:
//!   faer's kernels, AVX-512 where the CPU has it, split over both cores) on the operands'
//!   strides — no copy of a transposed weight, no `[batch, K, N]` temporary for `∂W` — with
//!   the bias folded into the output before the product.
//! - Softmax, layer norm and RMS norm are one pass per row (two for the statistics), forward
//!   and backward, rows spread over rayon.
//! - Activations and their derivatives are one elementwise pass.
//!
//! Tensors of other dtypes (f16, bf16, f64) take burn's ops.

use burn::backend::flex::{Flex, FlexTensor, Layout};
use burn::tensor::ops::ModuleOps;
use burn::tensor::{Bytes, DType, Shape, TensorMetadata, TensorPrimitive};
use rayon::prelude::*;
use ressa_sparse::kernels::gemm::{MatRef, gemm};

use super::math::{activate_slice, derivative_slice, softmax_row};
use super::{DenseBackend, composed};
use crate::config::Activation;

/// Rows × width below which a row op stays on the calling thread.
const PAR_ELEMS: usize = 1 << 15;

impl DenseBackend for Flex {
    const FUSED: bool = true;

    fn dense_linear(x: FlexTensor, w: FlexTensor, b: Option<FlexTensor>) -> FlexTensor {
        if !all_f32(&[Some(&x), Some(&w), b.as_ref()]) {
            return <Flex as ModuleOps<Flex>>::linear(x, w, b);
        }
        let dims = x.shape().to_vec();
        let k = *dims.last().expect("linear: input of rank ≥ 1");
        let [kw, n] = dims2(&w);
        assert_eq!(k, kw, "linear: input has {k} features, the weight {kw}");
        let m = rows_of(&dims);
        let x = x.to_contiguous();
        let xs = x.as_slice::<f32>().expect("contiguous f32");
        let mut out = vec![0.0f32; m * n];
        let accumulate = match &b {
            Some(b) => {
                let b = b.to_contiguous();
                let bs = b.as_slice::<f32>().expect("contiguous f32");
                assert_eq!(bs.len(), n, "linear: bias of {} for {n} outputs", bs.len());
                out.chunks_exact_mut(n.max(1))
                    .for_each(|r| r.copy_from_slice(bs));
                true
            }
            None => false,
        };
        let w = positive(w);
        gemm(&mut out, MatRef::row_major(xs, m, k), view2(&w), accumulate);
        let mut shape = dims;
        *shape.last_mut().expect("rank ≥ 1") = n;
        new_tensor(out, shape)
    }

    fn dense_linear_backward_x(w: FlexTensor, g: FlexTensor) -> FlexTensor {
        if !all_f32(&[Some(&w), Some(&g)]) {
            return <Flex as ModuleOps<Flex>>::linear_x_backward(w, g);
        }
        let dims = g.shape().to_vec();
        let [k, n] = dims2(&w);
        let m = rows_of(&dims);
        let g = g.to_contiguous();
        let gs = g.as_slice::<f32>().expect("contiguous f32");
        let w = positive(w);
        let mut out = vec![0.0f32; m * k];
        gemm(&mut out, MatRef::row_major(gs, m, n), view2(&w).t(), false);
        let mut shape = dims;
        *shape.last_mut().expect("rank ≥ 1") = k;
        new_tensor(out, shape)
    }

    fn dense_linear_backward_w(x: FlexTensor, g: FlexTensor) -> FlexTensor {
        if !all_f32(&[Some(&x), Some(&g)]) {
            return <Flex as ModuleOps<Flex>>::linear_weight_backward(x, g);
        }
        let (xd, gd) = (x.shape().to_vec(), g.shape().to_vec());
        let (k, n) = (*xd.last().expect("rank ≥ 1"), *gd.last().expect("rank ≥ 1"));
        let m = rows_of(&xd);
        let (x, g) = (x.to_contiguous(), g.to_contiguous());
        let xs = x.as_slice::<f32>().expect("contiguous f32");
        let gs = g.as_slice::<f32>().expect("contiguous f32");
        let mut out = vec![0.0f32; k * n];
        gemm(
            &mut out,
            MatRef::row_major(xs, m, k).t(),
            MatRef::row_major(gs, m, n),
            false,
        );
        new_tensor(out, vec![k, n])
    }

    fn dense_linear_backward_b(g: FlexTensor) -> FlexTensor {
        if !all_f32(&[Some(&g)]) {
            return <Flex as ModuleOps<Flex>>::linear_bias_backward(g);
        }
        let dims = g.shape().to_vec();
        let n = *dims.last().expect("rank ≥ 1");
        let g = g.to_contiguous();
        let gs = g.as_slice::<f32>().expect("contiguous f32");
        new_tensor(column_sums(gs, n), vec![n])
    }

    fn dense_lora_weight(
        w: FlexTensor,
        a: FlexTensor,
        b: FlexTensor,
        pruned: Option<FlexTensor>,
        scale: f64,
    ) -> FlexTensor {
        if !all_f32(&[Some(&w), Some(&a), Some(&b)]) {
            return composed_lora_weight(w, a, b, pruned, scale);
        }
        let [k, n] = dims2(&w);
        let [ka, r] = dims2(&a);
        assert!(
            ka == k && dims2(&b) == [r, n],
            "lora weight: A [{ka}, {r}], W [{k}, {n}]"
        );
        // out = W, then out += A·(s·B): one gemm accumulating onto the weight
        let w = w.to_contiguous();
        let mut out = w.as_slice::<f32>().expect("contiguous f32").to_vec();
        let b = b.to_contiguous();
        let sb: Vec<f32> = b
            .as_slice::<f32>()
            .expect("contiguous f32")
            .iter()
            .map(|v| v * scale as f32)
            .collect();
        let a = positive(a);
        gemm(&mut out, view2(&a), MatRef::row_major(&sb, r, n), true);
        if let Some(p) = pruned {
            zero_where(&mut out, &p);
        }
        new_tensor(out, vec![k, n])
    }

    fn dense_lora_weight_backward(
        a: FlexTensor,
        b: FlexTensor,
        pruned: Option<FlexTensor>,
        scale: f64,
        g: FlexTensor,
    ) -> [FlexTensor; 3] {
        if !all_f32(&[Some(&a), Some(&b), Some(&g)]) {
            return composed_lora_backward(a, b, pruned, scale, g);
        }
        let [k, n] = dims2(&g);
        let r = dims2(&a)[1];
        // U = g ⊙ M (reusing g's buffer when nothing else holds it)
        let mut u = g.into_data().into_vec::<f32>().expect("f32 checked above");
        if let Some(p) = pruned {
            zero_where(&mut u, &p);
        }
        let (a, b) = (positive(a), positive(b));
        let uv = MatRef::row_major(&u, k, n);
        let mut da = vec![0.0f32; k * r];
        gemm(&mut da, uv, view2(&b).t(), false);
        let mut db = vec![0.0f32; r * n];
        gemm(&mut db, view2(&a).t(), uv, false);
        let s = scale as f32;
        da.iter_mut().chain(db.iter_mut()).for_each(|v| *v *= s);
        [
            new_tensor(u, vec![k, n]),
            new_tensor(da, vec![k, r]),
            new_tensor(db, vec![r, n]),
        ]
    }

    fn dense_attention(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        bias: Option<FlexTensor>,
        scale: Option<f64>,
        keep_probs: bool,
    ) -> (FlexTensor, Option<FlexTensor>) {
        if !all_f32(&[Some(&q), Some(&k), Some(&v), bias.as_ref()]) {
            let (out, p) = composed::attention::<Flex>(q, k, v, bias, scale);
            return (out, keep_probs.then_some(p));
        }
        let (q, k, v) = (View4::new(q), View4::new(k), View4::new(v));
        let bias = bias.map(View4::new);
        let [nb, nh, lq, dh] = q.dims;
        let lk = k.dims[2];
        assert!(
            k.dims == [nb, nh, lk, dh] && v.dims == k.dims,
            "attention: q {:?}, k {:?}, v {:?}",
            q.dims,
            k.dims,
            v.dims
        );
        let scale = scale.map(|s| s as f32);
        // each (b, h) block: S = q·kᵀ·s + bias, P = softmax(S), O = P·v
        let block = |bh: usize, p: &mut [f32]| -> Vec<f32> {
            let (b, h) = (bh / nh, bh % nh);
            gemm(p, q.mat(b, h), k.mat(b, h).t(), false);
            for (i, row) in p.chunks_exact_mut(lk).enumerate() {
                if let Some(s) = scale {
                    row.iter_mut().for_each(|x| *x *= s);
                }
                if let Some(bias) = &bias {
                    bias.add_row(b, h, i, row);
                }
                softmax_row(row);
            }
            let mut o = vec![0.0f32; lq * dh];
            gemm(&mut o, MatRef::row_major(p, lq, lk), v.mat(b, h), false);
            o
        };
        let blocks = nb * nh;
        let mut probs = vec![0.0f32; if keep_probs { blocks * lq * lk } else { 0 }];
        let outs: Vec<Vec<f32>> = if keep_probs {
            par_blocks(&mut probs, lq * lk, |bh, p| block(bh, p))
        } else {
            let run = |bh: usize| block(bh, &mut vec![0.0f32; lq * lk]);
            if blocks * lq * lk * dh < PAR_ELEMS {
                (0..blocks).map(run).collect()
            } else {
                (0..blocks).into_par_iter().map(run).collect()
            }
        };
        let out = heads_to_tokens(&outs, nb, nh, lq, dh);
        let probs = keep_probs.then(|| new_tensor(probs, vec![nb, nh, lq, lk]));
        (out, probs)
    }

    fn dense_attention_backward(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        p: FlexTensor,
        g: FlexTensor,
        scale: Option<f64>,
        bias_shape: Option<Vec<usize>>,
    ) -> (FlexTensor, FlexTensor, FlexTensor, Option<FlexTensor>) {
        if !all_f32(&[Some(&q), Some(&k), Some(&v), Some(&p), Some(&g)]) {
            return composed::attention_backward::<Flex>(q, k, v, p, g, scale, bias_shape);
        }
        let (q, k, v, g) = (View4::new(q), View4::new(k), View4::new(v), View4::new(g));
        let p = p.to_contiguous();
        let ps = p.as_slice::<f32>().expect("contiguous f32");
        let [nb, nh, lq, dh] = q.dims;
        let lk = k.dims[2];
        let scale = scale.map(|s| s as f32);
        let keep_ds = bias_shape.is_some();
        let mut ds_all = vec![0.0f32; if keep_ds { nb * nh * lq * lk } else { 0 }];
        let block = |bh: usize, ds_out: &mut [f32]| -> [Vec<f32>; 3] {
            let (b, h) = (bh / nh, bh % nh);
            let pb = MatRef::row_major(&ps[bh * lq * lk..(bh + 1) * lq * lk], lq, lk);
            let gb = g.mat(b, h);
            let mut dv = vec![0.0f32; lk * dh];
            gemm(&mut dv, pb.t(), gb, false);
            let mut ds = vec![0.0f32; lq * lk];
            gemm(&mut ds, gb, v.mat(b, h).t(), false);
            let prow = &ps[bh * lq * lk..(bh + 1) * lq * lk];
            for (drow, prow) in ds.chunks_exact_mut(lk).zip(prow.chunks_exact(lk)) {
                let dot: f32 = drow.iter().zip(prow).map(|(a, b)| a * b).sum();
                for (d, p) in drow.iter_mut().zip(prow) {
                    *d = p * (*d - dot);
                }
            }
            if !ds_out.is_empty() {
                ds_out.copy_from_slice(&ds);
            }
            if let Some(s) = scale {
                ds.iter_mut().for_each(|x| *x *= s);
            }
            let dsm = MatRef::row_major(&ds, lq, lk);
            let mut dq = vec![0.0f32; lq * dh];
            gemm(&mut dq, dsm, k.mat(b, h), false);
            let mut dk = vec![0.0f32; lk * dh];
            gemm(&mut dk, dsm.t(), q.mat(b, h), false);
            [dq, dk, dv]
        };
        let blocks = nb * nh;
        let parts: Vec<[Vec<f32>; 3]> = if keep_ds {
            par_blocks(&mut ds_all, lq * lk, |bh, d| block(bh, d))
        } else if blocks * lq * lk * dh < PAR_ELEMS {
            (0..blocks).map(|bh| block(bh, &mut [])).collect()
        } else {
            (0..blocks)
                .into_par_iter()
                .map(|bh| block(bh, &mut []))
                .collect()
        };
        let pick = |i: usize| -> Vec<Vec<f32>> { parts.iter().map(|p| p[i].clone()).collect() };
        let dq = heads_to_tokens(&pick(0), nb, nh, lq, dh);
        let dk = heads_to_tokens(&pick(1), nb, nh, lk, dh);
        let dv = heads_to_tokens(&pick(2), nb, nh, lk, dh);
        let dbias = bias_shape.map(|shape| {
            use burn::prelude::*;
            let mut d = Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(new_tensor(
                ds_all,
                vec![nb, nh, lq, lk],
            )));
            for (dim, &n) in shape.iter().enumerate() {
                if n == 1 && d.dims()[dim] != 1 {
                    d = d.sum_dim(dim);
                }
            }
            d.into_primitive().tensor()
        });
        (dq, dk, dv, dbias)
    }

    fn dense_softmax(x: FlexTensor) -> FlexTensor {
        if !all_f32(&[Some(&x)]) {
            return composed::rows::<Flex>(x, |x| burn::tensor::activation::softmax(x, 1));
        }
        map_rows(x, |src, dst| {
            dst.copy_from_slice(src);
            softmax_row(dst);
        })
    }

    fn dense_softmax_backward(y: FlexTensor, g: FlexTensor) -> FlexTensor {
        if !all_f32(&[Some(&y), Some(&g)]) {
            return composed::rows2::<Flex>(y, g, |y, g| {
                let dot = (g.clone() * y.clone()).sum_dim(1);
                y * (g - dot)
            });
        }
        map_rows2(y, g, |y, g, dst| {
            let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
            for ((d, y), g) in dst.iter_mut().zip(y).zip(g) {
                *d = y * (g - dot);
            }
        })
    }

    fn dense_layer_norm(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: Option<FlexTensor>,
        eps: f64,
    ) -> FlexTensor {
        if !all_f32(&[Some(&x), Some(&gamma), beta.as_ref()]) {
            return composed::layer_norm::<Flex>(x, gamma, beta, eps);
        }
        let gamma = gamma.to_contiguous();
        let gm = gamma.as_slice::<f32>().expect("contiguous f32");
        let beta = beta.map(|b| b.to_contiguous());
        let bt = beta
            .as_ref()
            .map(|b| b.as_slice::<f32>().expect("contiguous f32"));
        map_rows(x, |src, dst| {
            let (mean, r) = mean_rstd(src, eps);
            match bt {
                Some(bt) => {
                    for (((d, s), g), b) in dst.iter_mut().zip(src).zip(gm).zip(bt) {
                        *d = (s - mean) * r * g + b;
                    }
                }
                None => {
                    for ((d, s), g) in dst.iter_mut().zip(src).zip(gm) {
                        *d = (s - mean) * r * g;
                    }
                }
            }
        })
    }

    fn dense_layer_norm_backward(
        x: FlexTensor,
        gamma: FlexTensor,
        g: FlexTensor,
        eps: f64,
    ) -> [FlexTensor; 3] {
        if !all_f32(&[Some(&x), Some(&gamma), Some(&g)]) {
            return composed::layer_norm_backward::<Flex>(x, gamma, g, eps);
        }
        let gamma = gamma.to_contiguous();
        let gm = gamma.as_slice::<f32>().expect("contiguous f32");
        let d = gm.len();
        let (x, g, dims) = (x.to_contiguous(), g.to_contiguous(), x.shape().to_vec());
        let xs = x.as_slice::<f32>().expect("contiguous f32");
        let gs = g.as_slice::<f32>().expect("contiguous f32");
        let mut dx = vec![0.0f32; xs.len()];
        // per-row ∂x, and per-chunk partial sums of g ⊙ x̂ and g for ∂γ, ∂β
        let partials = for_row_chunks(&mut dx, d, |start, out| {
            let (mut dgamma, mut dbeta) = (vec![0.0f32; d], vec![0.0f32; d]);
            for (i, dxr) in out.chunks_exact_mut(d).enumerate() {
                let row = (start + i) * d;
                let (xr, gr) = (&xs[row..row + d], &gs[row..row + d]);
                let (mean, r) = mean_rstd(xr, eps);
                let (mut s1, mut s2) = (0.0f32, 0.0f32);
                for j in 0..d {
                    let xh = (xr[j] - mean) * r;
                    let gh = gr[j] * gm[j];
                    s1 += gh;
                    s2 += gh * xh;
                    dgamma[j] += gr[j] * xh;
                    dbeta[j] += gr[j];
                }
                let (m1, m2) = (s1 / d as f32, s2 / d as f32);
                for j in 0..d {
                    let xh = (xr[j] - mean) * r;
                    dxr[j] = r * (gr[j] * gm[j] - m1 - xh * m2);
                }
            }
            (dgamma, dbeta)
        });
        let (dgamma, dbeta) = sum_partials(partials, d);
        [
            new_tensor(dx, dims),
            new_tensor(dgamma, vec![d]),
            new_tensor(dbeta, vec![d]),
        ]
    }

    fn dense_rms_norm(x: FlexTensor, w: FlexTensor, eps: f64) -> FlexTensor {
        if !all_f32(&[Some(&x), Some(&w)]) {
            return composed::rms_norm::<Flex>(x, w, eps);
        }
        let w = w.to_contiguous();
        let ws = w.as_slice::<f32>().expect("contiguous f32");
        map_rows(x, |src, dst| {
            let r = rms_rstd(src, eps);
            for ((d, s), w) in dst.iter_mut().zip(src).zip(ws) {
                *d = s * r * w;
            }
        })
    }

    fn dense_rms_norm_backward(
        x: FlexTensor,
        w: FlexTensor,
        g: FlexTensor,
        eps: f64,
    ) -> [FlexTensor; 2] {
        if !all_f32(&[Some(&x), Some(&w), Some(&g)]) {
            return composed::rms_norm_backward::<Flex>(x, w, g, eps);
        }
        let w = w.to_contiguous();
        let ws = w.as_slice::<f32>().expect("contiguous f32");
        let d = ws.len();
        let (x, g, dims) = (x.to_contiguous(), g.to_contiguous(), x.shape().to_vec());
        let xs = x.as_slice::<f32>().expect("contiguous f32");
        let gs = g.as_slice::<f32>().expect("contiguous f32");
        let mut dx = vec![0.0f32; xs.len()];
        let partials = for_row_chunks(&mut dx, d, |start, out| {
            let mut dw = vec![0.0f32; d];
            for (i, dxr) in out.chunks_exact_mut(d).enumerate() {
                let row = (start + i) * d;
                let (xr, gr) = (&xs[row..row + d], &gs[row..row + d]);
                let r = rms_rstd(xr, eps);
                let mut dot = 0.0f32;
                for j in 0..d {
                    dot += gr[j] * ws[j] * xr[j];
                    dw[j] += gr[j] * xr[j] * r;
                }
                let c = r * r * r * dot / d as f32;
                for j in 0..d {
                    dxr[j] = r * gr[j] * ws[j] - xr[j] * c;
                }
            }
            (dw, Vec::new())
        });
        let (dw, _) = sum_partials(partials, d);
        [new_tensor(dx, dims), new_tensor(dw, vec![d])]
    }

    fn dense_activation(x: FlexTensor, act: Activation) -> FlexTensor {
        if !all_f32(&[Some(&x)]) {
            return composed::flat::<Flex>(x, |x| composed::activate(x, act));
        }
        map_elems(x, |out, src| activate_slice(out, src, act))
    }

    fn dense_activation_backward(x: FlexTensor, g: FlexTensor, act: Activation) -> FlexTensor {
        if !all_f32(&[Some(&x), Some(&g)]) {
            return composed::flat2::<Flex>(x, g, |x, g| g * composed::derivative(x, act));
        }
        map_elems2(x, g, |out, x, g| derivative_slice(out, x, g, act))
    }
}

/// A rank-4 `f32` tensor read through its strides (`[B, H, L, dh]` views of `[B, L, H·dh]`
/// activations, broadcast biases): no copy unless a stride is negative.
struct View4 {
    t: FlexTensor,
    dims: [usize; 4],
    strides: [isize; 4],
}

impl View4 {
    fn new(t: FlexTensor) -> Self {
        let t = positive(t);
        let s = t.shape();
        assert_eq!(s.num_dims(), 4, "attention operand of rank 4, got {s:?}");
        let dims = [s[0], s[1], s[2], s[3]];
        let st = t.layout().strides();
        let strides = [st[0], st[1], st[2], st[3]];
        Self { t, dims, strides }
    }

    fn offset(&self, b: usize, h: usize) -> usize {
        self.t.layout().start_offset() + b * self.strides[0] as usize + h * self.strides[1] as usize
    }

    /// The `[L, dh]` matrix of batch `b`, head `h`.
    fn mat(&self, b: usize, h: usize) -> MatRef<'_> {
        MatRef::strided(
            self.t.storage::<f32>(),
            self.offset(b, h),
            self.dims[2],
            self.dims[3],
            self.strides[2],
            self.strides[3],
        )
    }

    /// `row += bias[b, h, i, :]`, broadcasting dimensions of size 1.
    fn add_row(&self, b: usize, h: usize, i: usize, row: &mut [f32]) {
        let [db, dh, dq, dk] = self.dims;
        assert_eq!(
            dk,
            row.len(),
            "attention bias: {dk} keys for rows of {}",
            row.len()
        );
        let data = self.t.storage::<f32>();
        let pick = |x: usize, n: usize| if n > 1 { x } else { 0 };
        let (b, h, i) = (pick(b, db), pick(h, dh), pick(i, dq));
        let base = self.offset(b, h) + i * self.strides[2] as usize;
        let s = self.strides[3] as usize;
        if s == 1 {
            row.iter_mut()
                .zip(&data[base..base + dk])
                .for_each(|(r, v)| *r += v);
        } else {
            row.iter_mut()
                .enumerate()
                .for_each(|(j, r)| *r += data[base + j * s]);
        }
    }
}

/// `f(block, chunk)` over consecutive `size`-element chunks of `buf` (one per block), in
/// parallel when there is enough work; the results in block order.
fn par_blocks<R: Send>(
    buf: &mut [f32],
    size: usize,
    f: impl Fn(usize, &mut [f32]) -> R + Sync,
) -> Vec<R> {
    if buf.len() < PAR_ELEMS {
        buf.chunks_exact_mut(size.max(1))
            .enumerate()
            .map(|(i, c)| f(i, c))
            .collect()
    } else {
        buf.par_chunks_exact_mut(size.max(1))
            .enumerate()
            .map(|(i, c)| f(i, c))
            .collect()
    }
}

/// Per-(b, h) blocks `[L, dh]` laid out as `[B, L, H, dh]` and returned as the `[B, H, L, dh]`
/// view of that buffer: merging the heads afterwards (`swap_dims(1, 2)` + `reshape`) is free.
fn heads_to_tokens(blocks: &[Vec<f32>], nb: usize, nh: usize, l: usize, dh: usize) -> FlexTensor {
    let mut out = vec![0.0f32; nb * l * nh * dh];
    for (bh, blk) in blocks.iter().enumerate() {
        let (b, h) = (bh / nh, bh % nh);
        for (i, row) in blk.chunks_exact(dh.max(1)).enumerate() {
            let at = ((b * l + i) * nh + h) * dh;
            out[at..at + dh].copy_from_slice(row);
        }
    }
    let strides = vec![(l * nh * dh) as isize, dh as isize, (nh * dh) as isize, 1];
    FlexTensor::new(
        Bytes::from_elems(out),
        Layout::new(Shape::from(vec![nb, nh, l, dh]), strides, 0),
        DType::F32,
    )
}

fn composed_lora_weight(
    w: FlexTensor,
    a: FlexTensor,
    b: FlexTensor,
    pruned: Option<FlexTensor>,
    scale: f64,
) -> FlexTensor {
    use burn::prelude::*;
    let t = |x: FlexTensor| Tensor::<Flex, 2>::from_primitive(TensorPrimitive::Float(x));
    let weff = t(w) + t(a).matmul(t(b)).mul_scalar(scale);
    let weff = match pruned {
        Some(p) => weff.mask_fill(Tensor::<Flex, 2, Bool>::from_primitive(p), 0.0),
        None => weff,
    };
    weff.into_primitive().tensor()
}

fn composed_lora_backward(
    a: FlexTensor,
    b: FlexTensor,
    pruned: Option<FlexTensor>,
    scale: f64,
    g: FlexTensor,
) -> [FlexTensor; 3] {
    use burn::prelude::*;
    let t = |x: FlexTensor| Tensor::<Flex, 2>::from_primitive(TensorPrimitive::Float(x));
    let u = match pruned {
        Some(p) => t(g).mask_fill(Tensor::<Flex, 2, Bool>::from_primitive(p), 0.0),
        None => t(g),
    };
    let da = u.clone().matmul(t(b).transpose()).mul_scalar(scale);
    let db = t(a).transpose().matmul(u.clone()).mul_scalar(scale);
    [u, da, db].map(|x| x.into_primitive().tensor())
}

/// Zeroes `values[i]` where the bool tensor `pruned` (same element count) is true.
fn zero_where(values: &mut [f32], pruned: &FlexTensor) {
    let p = pruned.to_contiguous();
    let start = p.layout().start_offset();
    let mask = &p.storage::<u8>()[start..start + values.len()];
    let body = |(v, m): (&mut [f32], &[u8])| {
        for (v, m) in v.iter_mut().zip(m) {
            if *m != 0 {
                *v = 0.0;
            }
        }
    };
    if values.len() < PAR_ELEMS {
        body((values, mask));
    } else {
        values
            .par_chunks_mut(1 << 14)
            .zip(mask.par_chunks(1 << 14))
            .for_each(body);
    }
}

/// Mean and `1/√(var + ε)` of a row (biased variance, two passes).
#[inline]
fn mean_rstd(row: &[f32], eps: f64) -> (f32, f32) {
    let n = row.len().max(1) as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps as f32).sqrt())
}

/// `1/√(mean(x²) + ε)` of a row.
#[inline]
fn rms_rstd(row: &[f32], eps: f64) -> f32 {
    let n = row.len().max(1) as f32;
    let ms = row.iter().map(|v| v * v).sum::<f32>() / n;
    1.0 / (ms + eps as f32).sqrt()
}

fn all_f32(ts: &[Option<&FlexTensor>]) -> bool {
    ts.iter().flatten().all(|t| t.dtype() == DType::F32)
}

fn rows_of(dims: &[usize]) -> usize {
    dims[..dims.len().saturating_sub(1)].iter().product()
}

fn dims2(t: &FlexTensor) -> [usize; 2] {
    let s = t.shape();
    assert_eq!(s.num_dims(), 2, "a weight of rank 2, got {s:?}");
    [s[0], s[1]]
}

/// `t`, copied to a contiguous buffer only when a stride is negative (a flipped view).
fn positive(t: FlexTensor) -> FlexTensor {
    if t.layout().has_positive_strides() {
        t
    } else {
        t.to_contiguous()
    }
}

/// A 2-D tensor with non-negative strides as a gemm operand.
fn view2(t: &FlexTensor) -> MatRef<'_> {
    let [r, c] = dims2(t);
    let s = t.layout().strides();
    MatRef::strided(
        t.storage::<f32>(),
        t.layout().start_offset(),
        r,
        c,
        s[0],
        s[1],
    )
}

fn new_tensor(data: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::new(
        Bytes::from_elems(data),
        Layout::contiguous(Shape::from(shape)),
        DType::F32,
    )
}

/// `f(first_row, rows)` over chunks of whole rows of `out` (width `d`), in parallel when the
/// tensor is large; the chunks' results in order.
fn for_row_chunks<R: Send>(
    out: &mut [f32],
    d: usize,
    f: impl Fn(usize, &mut [f32]) -> R + Sync,
) -> Vec<R> {
    let d = d.max(1);
    if out.len() < PAR_ELEMS {
        return vec![f(0, out)];
    }
    let per = rows_per_chunk(out.len(), d);
    out.par_chunks_mut(per * d)
        .enumerate()
        .map(|(i, c)| f(i * per, c))
        .collect()
}

/// Sums per-chunk partial vectors.
fn sum_partials(parts: Vec<(Vec<f32>, Vec<f32>)>, d: usize) -> (Vec<f32>, Vec<f32>) {
    let (mut a, mut b) = (vec![0.0f32; d], vec![0.0f32; d]);
    for (pa, pb) in parts {
        a.iter_mut().zip(&pa).for_each(|(x, y)| *x += y);
        b.iter_mut().zip(&pb).for_each(|(x, y)| *x += y);
    }
    (a, b)
}

/// Column sums of a row-major `[rows, n]` buffer.
fn column_sums(g: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; n];
    for row in g.chunks_exact(n.max(1)) {
        out.iter_mut().zip(row).for_each(|(o, v)| *o += v);
    }
    out
}

/// `f(src_row, dst_row)` over the rows (last dimension) of `x` into a new contiguous tensor.
fn map_rows(x: FlexTensor, f: impl Fn(&[f32], &mut [f32]) + Sync) -> FlexTensor {
    let dims = x.shape().to_vec();
    let d = dims.last().copied().unwrap_or(1).max(1);
    let x = x.to_contiguous();
    let xs = x.as_slice::<f32>().expect("contiguous f32");
    let mut out = vec![0.0f32; xs.len()];
    let body = |(dst, src): (&mut [f32], &[f32])| {
        for (d_row, s_row) in dst.chunks_exact_mut(d).zip(src.chunks_exact(d)) {
            f(s_row, d_row);
        }
    };
    if xs.len() < PAR_ELEMS {
        body((&mut out, xs));
    } else {
        let per = rows_per_chunk(xs.len(), d);
        out.par_chunks_mut(per * d)
            .zip(xs.par_chunks(per * d))
            .for_each(body);
    }
    new_tensor(out, dims)
}

/// `f(a_row, b_row, dst_row)` over the rows of two tensors of one shape.
fn map_rows2(
    a: FlexTensor,
    b: FlexTensor,
    f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
) -> FlexTensor {
    let dims = a.shape().to_vec();
    assert_eq!(dims, b.shape().to_vec(), "row op: shapes differ");
    let d = dims.last().copied().unwrap_or(1).max(1);
    let (a, b) = (a.to_contiguous(), b.to_contiguous());
    let (as_, bs) = (
        a.as_slice::<f32>().expect("contiguous f32"),
        b.as_slice::<f32>().expect("contiguous f32"),
    );
    let mut out = vec![0.0f32; as_.len()];
    let body = |((dst, a), b): ((&mut [f32], &[f32]), &[f32])| {
        for ((d_row, a_row), b_row) in dst
            .chunks_exact_mut(d)
            .zip(a.chunks_exact(d))
            .zip(b.chunks_exact(d))
        {
            f(a_row, b_row, d_row);
        }
    };
    if as_.len() < PAR_ELEMS {
        body(((&mut out, as_), bs));
    } else {
        let per = rows_per_chunk(as_.len(), d) * d;
        out.par_chunks_mut(per)
            .zip(as_.par_chunks(per))
            .zip(bs.par_chunks(per))
            .for_each(body);
    }
    new_tensor(out, dims)
}

fn rows_per_chunk(len: usize, d: usize) -> usize {
    let rows = len / d.max(1);
    rows.div_ceil(2 * rayon::current_num_threads()).max(1)
}

/// `f(out_chunk, src_chunk)` over chunks of `x` into a new tensor.
fn map_elems(x: FlexTensor, f: impl Fn(&mut [f32], &[f32]) + Sync) -> FlexTensor {
    let dims = x.shape().to_vec();
    let x = x.to_contiguous();
    let xs = x.as_slice::<f32>().expect("contiguous f32");
    let mut out = vec![0.0f32; xs.len()];
    if xs.len() < PAR_ELEMS {
        f(&mut out, xs);
    } else {
        out.par_chunks_mut(1 << 13)
            .zip(xs.par_chunks(1 << 13))
            .for_each(|(o, s)| f(o, s));
    }
    new_tensor(out, dims)
}

/// `f(out_chunk, a_chunk, b_chunk)` over chunks of two tensors of one shape.
fn map_elems2(
    a: FlexTensor,
    b: FlexTensor,
    f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync,
) -> FlexTensor {
    let dims = a.shape().to_vec();
    assert_eq!(dims, b.shape().to_vec(), "elementwise op: shapes differ");
    let (a, b) = (a.to_contiguous(), b.to_contiguous());
    let (as_, bs) = (
        a.as_slice::<f32>().expect("contiguous f32"),
        b.as_slice::<f32>().expect("contiguous f32"),
    );
    let mut out = vec![0.0f32; as_.len()];
    if as_.len() < PAR_ELEMS {
        f(&mut out, as_, bs);
    } else {
        out.par_chunks_mut(1 << 13)
            .zip(as_.par_chunks(1 << 13))
            .zip(bs.par_chunks(1 << 13))
            .for_each(|((o, a), b)| f(o, a, b));
    }
    new_tensor(out, dims)
}
