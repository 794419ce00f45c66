//! [`DenseBackend`] on `Autodiff<B>`: each op is one graph node whose backward calls `B`'s
//! gradient kernels, and computes a gradient only for the inputs that require one (a frozen
//! weight gets none, a frozen input's `∂x` is skipped).
//!
//! Where `B` has no fused kernels (`B::FUSED` false: NdArray, Wgpu, Cuda) the ops are burn's
//! own autodiff ops, as before this module existed.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::prelude::*;
use burn::tensor::activation as burn_act;
use burn::tensor::ops::{BoolTensor, FloatTensor, ModuleOps};
use burn::tensor::{TensorMetadata, TensorPrimitive};

use super::{DenseBackend, composed};
use crate::config::Activation;

type AdTensor<B, C> = FloatTensor<Autodiff<B, C>>;

fn retrieve<B: Backend>(checkpointer: &mut Checkpointer, id: Option<NodeId>) -> FloatTensor<B> {
    checkpointer.retrieve_node_output::<FloatTensor<B>>(id.expect("checkpointed in forward"))
}

#[derive(Debug)]
struct LinearOp;

/// (x if W or b... needs it: x for ∂W, W for ∂x)
type LinearState = (Option<NodeId>, Option<NodeId>);

impl<B: DenseBackend, const N: usize> Backward<B, N> for LinearOp {
    type State = LinearState;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, ckp: &mut Checkpointer) {
        let g = grads.consume::<B>(&ops.node);
        let (x_id, w_id) = ops.state;
        let mut parents = ops.parents.into_iter();
        let (px, pw, pb) = (
            parents.next().flatten(),
            parents.next().flatten(),
            parents.next().flatten(),
        );
        if let Some(node) = pb {
            grads.register::<B>(node.id, B::dense_linear_backward_b(g.clone()));
        }
        if let Some(node) = pw {
            let x = retrieve::<B>(ckp, x_id);
            grads.register::<B>(node.id, B::dense_linear_backward_w(x, g.clone()));
        }
        if let Some(node) = px {
            let w = retrieve::<B>(ckp, w_id);
            grads.register::<B>(node.id, B::dense_linear_backward_x(w, g));
        }
    }
}

fn linear_node<B: DenseBackend, C: CheckpointStrategy, const N: usize>(
    kind: OpsKind<LinearOp, B, LinearState, C, N>,
    x: AdTensor<B, C>,
    w: AdTensor<B, C>,
    b: Option<AdTensor<B, C>>,
) -> AdTensor<B, C> {
    let forward = |x: FloatTensor<B>, w, b: Option<FloatTensor<B>>| B::dense_linear(x, w, b);
    match kind {
        OpsKind::Tracked(mut prep) => {
            // x is needed only for ∂W, W only for ∂x
            let x_id = w.is_tracked().then(|| prep.checkpoint(&x));
            let w_id = x.is_tracked().then(|| prep.checkpoint(&w));
            let out = forward(x.primitive, w.primitive, b.map(|b| b.primitive));
            prep.finish((x_id, w_id), out)
        }
        OpsKind::UnTracked(prep) => {
            prep.finish(forward(x.primitive, w.primitive, b.map(|b| b.primitive)))
        }
    }
}

#[derive(Debug)]
struct LoraWeightOp<B: Backend>(std::marker::PhantomData<B>);

impl<B: DenseBackend> Backward<B, 3> for LoraWeightOp<B> {
    /// (A, B, pruned, s)
    type State = (NodeId, NodeId, Option<BoolTensor<B>>, f64);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, ckp: &mut Checkpointer) {
        let g = grads.consume::<B>(&ops.node);
        let (a_id, b_id, pruned, scale) = ops.state;
        let a = retrieve::<B>(ckp, Some(a_id));
        let b = retrieve::<B>(ckp, Some(b_id));
        let grads_wab = B::dense_lora_weight_backward(a, b, pruned, scale, g);
        for (parent, grad) in ops.parents.into_iter().zip(grads_wab) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

#[derive(Debug)]
struct AttentionOp<B: Backend>(std::marker::PhantomData<B>);

/// (q, k, v, P, scale, the bias's shape when it takes a gradient)
type AttentionState<B> = (
    NodeId,
    NodeId,
    NodeId,
    FloatTensor<B>,
    Option<f64>,
    Option<Vec<usize>>,
);

impl<B: DenseBackend, const N: usize> Backward<B, N> for AttentionOp<B> {
    type State = AttentionState<B>;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, ckp: &mut Checkpointer) {
        let g = grads.consume::<B>(&ops.node);
        let (q_id, k_id, v_id, p, scale, bias_shape) = ops.state;
        let q = retrieve::<B>(ckp, Some(q_id));
        let k = retrieve::<B>(ckp, Some(k_id));
        let v = retrieve::<B>(ckp, Some(v_id));
        let (dq, dk, dv, dbias) = B::dense_attention_backward(q, k, v, p, g, scale, bias_shape);
        let mut parents = ops.parents.into_iter();
        for grad in [Some(dq), Some(dk), Some(dv), dbias] {
            if let (Some(Some(node)), Some(grad)) = (parents.next(), grad) {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

#[derive(Debug)]
struct SoftmaxOp;

impl<B: DenseBackend> Backward<B, 1> for SoftmaxOp {
    /// The forward's output.
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = grads.consume::<B>(&ops.node);
        if let [Some(node)] = ops.parents {
            grads.register::<B>(node.id, B::dense_softmax_backward(ops.state, g));
        }
    }
}

#[derive(Debug)]
struct LayerNormOp;

impl<B: DenseBackend, const N: usize> Backward<B, N> for LayerNormOp {
    /// (x, γ, ε)
    type State = (NodeId, NodeId, f64);

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, ckp: &mut Checkpointer) {
        let g = grads.consume::<B>(&ops.node);
        let (x_id, gamma_id, eps) = ops.state;
        let x = retrieve::<B>(ckp, Some(x_id));
        let gamma = retrieve::<B>(ckp, Some(gamma_id));
        let [dx, dgamma, dbeta] = B::dense_layer_norm_backward(x, gamma, g, eps);
        let mut parents = ops.parents.into_iter();
        for (parent, grad) in [parents.next(), parents.next(), parents.next()]
            .into_iter()
            .zip([dx, dgamma, dbeta])
        {
            if let Some(node) = parent.flatten() {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

#[derive(Debug)]
struct RmsNormOp;

impl<B: DenseBackend> Backward<B, 2> for RmsNormOp {
    /// (x, w, ε)
    type State = (NodeId, NodeId, f64);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, ckp: &mut Checkpointer) {
        let g = grads.consume::<B>(&ops.node);
        let (x_id, w_id, eps) = ops.state;
        let x = retrieve::<B>(ckp, Some(x_id));
        let w = retrieve::<B>(ckp, Some(w_id));
        let [dx, dw] = B::dense_rms_norm_backward(x, w, g, eps);
        let [px, pw] = ops.parents;
        if let Some(node) = px {
            grads.register::<B>(node.id, dx);
        }
        if let Some(node) = pw {
            grads.register::<B>(node.id, dw);
        }
    }
}

#[derive(Debug)]
struct ActivationOp;

impl<B: DenseBackend> Backward<B, 1> for ActivationOp {
    /// (x, which)
    type State = (NodeId, Activation);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, ckp: &mut Checkpointer) {
        let g = grads.consume::<B>(&ops.node);
        let (x_id, act) = ops.state;
        if let [Some(node)] = ops.parents {
            let x = retrieve::<B>(ckp, Some(x_id));
            grads.register::<B>(node.id, B::dense_activation_backward(x, g, act));
        }
    }
}

impl<B: DenseBackend, C: CheckpointStrategy> DenseBackend for Autodiff<B, C> {
    const FUSED: bool = B::FUSED;

    fn dense_linear(
        x: AdTensor<B, C>,
        w: AdTensor<B, C>,
        b: Option<AdTensor<B, C>>,
    ) -> AdTensor<B, C> {
        if !B::FUSED {
            return <Self as ModuleOps<Self>>::linear(x, w, b);
        }
        match b {
            Some(b) => {
                let nodes = [x.node.clone(), w.node.clone(), b.node.clone()];
                let kind = Backward::<B, 3>::prepare::<C>(LinearOp, nodes)
                    .compute_bound()
                    .stateful();
                linear_node(kind, x, w, Some(b))
            }
            None => {
                let nodes = [x.node.clone(), w.node.clone()];
                let kind = Backward::<B, 2>::prepare::<C>(LinearOp, nodes)
                    .compute_bound()
                    .stateful();
                linear_node(kind, x, w, None)
            }
        }
    }

    fn dense_lora_weight(
        w: AdTensor<B, C>,
        a: AdTensor<B, C>,
        b: AdTensor<B, C>,
        pruned: Option<BoolTensor<Self>>,
        scale: f64,
    ) -> AdTensor<B, C> {
        if !B::FUSED {
            let update = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(a))
                .matmul(Tensor::from_primitive(TensorPrimitive::Float(b)))
                .mul_scalar(scale);
            let weff = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(w)) + update;
            let weff = match pruned {
                Some(p) => weff.mask_fill(Tensor::<Self, 2, Bool>::from_primitive(p), 0.0),
                None => weff,
            };
            return weff.into_primitive().tensor();
        }
        let nodes = [w.node.clone(), a.node.clone(), b.node.clone()];
        let kind = LoraWeightOp::<B>(std::marker::PhantomData)
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful();
        match kind {
            OpsKind::Tracked(mut prep) => {
                let state = (
                    prep.checkpoint(&a),
                    prep.checkpoint(&b),
                    pruned.clone(),
                    scale,
                );
                let out =
                    B::dense_lora_weight(w.primitive, a.primitive, b.primitive, pruned, scale);
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::dense_lora_weight(
                w.primitive,
                a.primitive,
                b.primitive,
                pruned,
                scale,
            )),
        }
    }

    fn dense_attention(
        q: AdTensor<B, C>,
        k: AdTensor<B, C>,
        v: AdTensor<B, C>,
        bias: Option<AdTensor<B, C>>,
        scale: Option<f64>,
        _keep_probs: bool,
    ) -> (AdTensor<B, C>, Option<AdTensor<B, C>>) {
        if !B::FUSED {
            let (out, _) = composed::attention::<Self>(q, k, v, bias, scale);
            return (out, None);
        }
        let bias_tracked = bias.as_ref().is_some_and(|b| b.is_tracked());
        macro_rules! node {
            ($n:literal, $nodes:expr) => {{
                let kind = AttentionOp::<B>(std::marker::PhantomData)
                    .prepare::<C>($nodes)
                    .compute_bound()
                    .stateful();
                match kind {
                    OpsKind::Tracked(mut prep) => {
                        let ids = (
                            prep.checkpoint(&q),
                            prep.checkpoint(&k),
                            prep.checkpoint(&v),
                        );
                        let bias_shape = bias
                            .as_ref()
                            .filter(|_| bias_tracked)
                            .map(|b| b.primitive.shape().to_vec());
                        let (out, p) = B::dense_attention(
                            q.primitive,
                            k.primitive,
                            v.primitive,
                            bias.map(|b| b.primitive),
                            scale,
                            true,
                        );
                        let p = p.expect("probabilities kept");
                        prep.finish((ids.0, ids.1, ids.2, p, scale, bias_shape), out)
                    }
                    OpsKind::UnTracked(prep) => {
                        let (out, _) = B::dense_attention(
                            q.primitive,
                            k.primitive,
                            v.primitive,
                            bias.map(|b| b.primitive),
                            scale,
                            false,
                        );
                        prep.finish(out)
                    }
                }
            }};
        }
        let out = match &bias {
            Some(b) => node!(
                4,
                [
                    q.node.clone(),
                    k.node.clone(),
                    v.node.clone(),
                    b.node.clone()
                ]
            ),
            None => node!(3, [q.node.clone(), k.node.clone(), v.node.clone()]),
        };
        (out, None)
    }

    fn dense_softmax(x: AdTensor<B, C>) -> AdTensor<B, C> {
        if !B::FUSED {
            return composed::rows::<Self>(x, |x| burn_act::softmax(x, 1));
        }
        let kind = Backward::<B, 1>::prepare::<C>(SoftmaxOp, [x.node.clone()])
            .compute_bound()
            .stateful();
        match kind {
            OpsKind::Tracked(prep) => {
                let y = B::dense_softmax(x.primitive);
                prep.finish(y.clone(), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::dense_softmax(x.primitive)),
        }
    }

    fn dense_layer_norm(
        x: AdTensor<B, C>,
        gamma: AdTensor<B, C>,
        beta: Option<AdTensor<B, C>>,
        eps: f64,
    ) -> AdTensor<B, C> {
        if !B::FUSED {
            return composed::layer_norm::<Self>(x, gamma, beta, eps);
        }
        macro_rules! node {
            ($n:literal, $nodes:expr) => {{
                let kind = Backward::<B, $n>::prepare::<C>(LayerNormOp, $nodes)
                    .compute_bound()
                    .stateful();
                match kind {
                    OpsKind::Tracked(mut prep) => {
                        let state = (prep.checkpoint(&x), prep.checkpoint(&gamma), eps);
                        let y = B::dense_layer_norm(
                            x.primitive,
                            gamma.primitive,
                            beta.map(|b| b.primitive),
                            eps,
                        );
                        prep.finish(state, y)
                    }
                    OpsKind::UnTracked(prep) => prep.finish(B::dense_layer_norm(
                        x.primitive,
                        gamma.primitive,
                        beta.map(|b| b.primitive),
                        eps,
                    )),
                }
            }};
        }
        match &beta {
            Some(b) => node!(3, [x.node.clone(), gamma.node.clone(), b.node.clone()]),
            None => node!(2, [x.node.clone(), gamma.node.clone()]),
        }
    }

    fn dense_rms_norm(x: AdTensor<B, C>, w: AdTensor<B, C>, eps: f64) -> AdTensor<B, C> {
        if !B::FUSED {
            return composed::rms_norm::<Self>(x, w, eps);
        }
        let kind = Backward::<B, 2>::prepare::<C>(RmsNormOp, [x.node.clone(), w.node.clone()])
            .compute_bound()
            .stateful();
        match kind {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&x), prep.checkpoint(&w), eps);
                prep.finish(state, B::dense_rms_norm(x.primitive, w.primitive, eps))
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::dense_rms_norm(x.primitive, w.primitive, eps))
            }
        }
    }

    fn dense_activation(x: AdTensor<B, C>, act: Activation) -> AdTensor<B, C> {
        if !B::FUSED {
            return composed::flat::<Self>(x, |x| composed::activate(x, act));
        }
        let kind = Backward::<B, 1>::prepare::<C>(ActivationOp, [x.node.clone()])
            .compute_bound()
            .stateful();
        match kind {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&x), act);
                prep.finish(state, B::dense_activation(x.primitive, act))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::dense_activation(x.primitive, act)),
        }
    }
}

#[cfg(test)]
mod tests {
    //! Each fused op against burn's composed ops on Flex: forward values and the gradients of
    //! every input, with and without the optional ones, on ragged shapes.

    use super::*;
    use crate::ops::{float, tensor};
    use burn::backend::Flex;
    use burn::tensor::{Distribution, Tolerance};

    type AD = Autodiff<Flex>;

    fn rand<const D: usize>(shape: [usize; D], seed: u64) -> Tensor<AD, D> {
        <Flex as Backend>::seed(&Default::default(), seed);
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
    }

    fn close<const D: usize>(a: Tensor<AD, D>, b: Tensor<AD, D>, what: &str) {
        let (a, b) = (a.inner().into_data(), b.inner().into_data());
        let scale = b.iter::<f32>().fold(0.0f32, |m, v| m.max(v.abs())).max(1.0);
        for (i, (x, y)) in a.iter::<f32>().zip(b.iter::<f32>()).enumerate() {
            assert!(
                (x - y).abs() <= 2e-5 * scale,
                "{what}[{i}]: fused {x} vs composed {y}"
            );
        }
        let _ = Tolerance::<f32>::default();
    }

    /// Runs `fused` and `reference` on fresh leaves from `inputs` with the loss Σ out ⊙ r, and
    /// compares outputs and each leaf's gradient.
    fn check<const D: usize>(
        what: &str,
        inputs: &[Tensor<AD, D>],
        fused: impl Fn(&[Tensor<AD, D>]) -> Tensor<AD, D>,
        reference: impl Fn(&[Tensor<AD, D>]) -> Tensor<AD, D>,
    ) {
        let leaves = |_: ()| -> Vec<Tensor<AD, D>> {
            inputs
                .iter()
                .map(|t| Tensor::from_data(t.to_data(), &Default::default()).require_grad())
                .collect()
        };
        let (lf, lr) = (leaves(()), leaves(()));
        let (yf, yr) = (fused(&lf), reference(&lr));
        let r = rand(yf.dims(), 99);
        close(yf.clone(), yr.clone(), &format!("{what} forward"));
        let gf = (yf * r.clone()).sum().backward();
        let gr = (yr * r).sum().backward();
        for (i, (a, b)) in lf.iter().zip(&lr).enumerate() {
            let (ga, gb) = (a.grad(&gf), b.grad(&gr));
            assert_eq!(
                ga.is_some(),
                gb.is_some(),
                "{what}: input {i} grad presence"
            );
            if let (Some(ga), Some(gb)) = (ga, gb) {
                let (ga, gb) = (Tensor::<AD, D>::from_inner(ga), Tensor::from_inner(gb));
                close(ga, gb, &format!("{what} ∂input{i}"));
            }
        }
    }

    #[test]
    fn linear_matches_burn_with_and_without_bias() {
        for (x_shape, n) in [([2, 5, 7], 11), ([1, 64, 48], 70), ([3, 1, 300], 5)] {
            let k = x_shape[2];
            let x = rand(x_shape, 1);
            let w = rand([1, k, n], 2);
            let b = rand([1, 1, n], 3);
            check(
                "linear+b",
                &[x.clone(), w.clone(), b.clone()],
                |t| {
                    super::super::linear(
                        t[0].clone(),
                        t[1].clone().squeeze_dim(0),
                        Some(t[2].clone().reshape([n])),
                    )
                },
                |t| {
                    burn::tensor::module::linear(
                        t[0].clone(),
                        t[1].clone().squeeze_dim(0),
                        Some(t[2].clone().reshape([n])),
                    )
                },
            );
            check(
                "linear",
                &[x, w],
                |t| super::super::linear(t[0].clone(), t[1].clone().squeeze_dim(0), None),
                |t| burn::tensor::module::linear(t[0].clone(), t[1].clone().squeeze_dim(0), None),
            );
        }
    }

    #[test]
    fn lora_weight_matches_burn_masked_or_not() {
        let (k, r, n) = (37, 4, 29);
        let keep: Vec<bool> = (0..k * n).map(|i| (i * 7 + i / n) % 3 != 0).collect();
        let pruned = Tensor::<AD, 2, Bool>::from_data(
            TensorData::new(keep.iter().map(|k| !k).collect::<Vec<_>>(), [k, n]),
            &Default::default(),
        );
        for mask in [Some(pruned), None] {
            let inputs = [rand([k, n], 21), rand([k, r], 22), rand([r, n], 23)];
            check(
                "lora_weight",
                &inputs,
                |t| {
                    super::super::lora_weight(
                        t[0].clone(),
                        t[1].clone(),
                        t[2].clone(),
                        mask.clone(),
                        4.0,
                    )
                },
                |t| {
                    let w = t[0].clone() + t[1].clone().matmul(t[2].clone()).mul_scalar(4.0);
                    match &mask {
                        Some(m) => w.mask_fill(m.clone(), 0.0),
                        None => w,
                    }
                },
            );
        }
    }

    #[test]
    fn attention_matches_burn_with_broadcast_biases() {
        // q/k/v as the models make them: [B, L, H·dh] split into heads (strided views)
        let heads = |t: Tensor<AD, 4>| {
            let [b, l, h, d] = t.dims();
            t.reshape([b, l, h, d]).swap_dims(1, 2)
        };
        for (b, h, lq, lk, dh, bias_shape) in [
            (2, 3, 5, 7, 4, Some([2, 1, 1, 7])),
            (1, 2, 6, 6, 8, Some([1, 2, 6, 6])),
            (2, 2, 3, 9, 5, None),
            (3, 4, 40, 33, 16, Some([3, 4, 40, 33])),
        ] {
            let inputs = [
                rand([b, lq, h, dh], 31),
                rand([b, lk, h, dh], 32),
                rand([b, lk, h, dh], 33),
                match bias_shape {
                    Some(s) => rand(s, 34),
                    None => Tensor::zeros([1, 1, 1, 1], &Default::default()),
                },
            ];
            let n = if bias_shape.is_some() { 4 } else { 3 };
            for scale in [None, Some(0.35)] {
                check(
                    &format!("attention {b}x{h}x{lq}x{lk}x{dh} {bias_shape:?} {scale:?}"),
                    &inputs[..n],
                    |t| {
                        let out = super::super::attention(
                            heads(t[0].clone()),
                            heads(t[1].clone()),
                            heads(t[2].clone()),
                            scale,
                            t.get(3).cloned(),
                        );
                        out.swap_dims(1, 2)
                    },
                    |t| {
                        let (q, k, v) = (
                            heads(t[0].clone()),
                            heads(t[1].clone()),
                            heads(t[2].clone()),
                        );
                        let mut s = q.matmul(k.swap_dims(2, 3));
                        if let Some(sc) = scale {
                            s = s.mul_scalar(sc);
                        }
                        if let Some(bias) = t.get(3) {
                            s = s + bias.clone();
                        }
                        burn_act::softmax(s, 3).matmul(v).swap_dims(1, 2)
                    },
                );
            }
        }
    }

    #[test]
    fn frozen_inputs_get_no_gradient() {
        let x = rand([4, 9], 5);
        let w = rand([9, 6], 6).require_grad();
        let y = super::super::linear(x.clone(), w.clone(), None);
        let g = y.sum().backward();
        assert!(w.grad(&g).is_some());
        assert!(x.grad(&g).is_none());
    }

    #[test]
    fn softmax_norms_and_activations_match_burn() {
        for shape in [[2, 3, 17], [1, 40, 1030]] {
            let d = shape[2];
            let x = rand(shape, 7).mul_scalar(3.0);
            check(
                "softmax",
                std::slice::from_ref(&x),
                |t| super::super::softmax(t[0].clone()),
                |t| burn_act::softmax(t[0].clone(), 2),
            );
            let gamma = rand([1, 1, d], 8);
            let beta = rand([1, 1, d], 9);
            check(
                "layer_norm",
                &[x.clone(), gamma.clone(), beta.clone()],
                |t| {
                    super::super::layer_norm(
                        t[0].clone(),
                        t[1].clone().reshape([d]),
                        Some(t[2].clone().reshape([d])),
                        1e-6,
                    )
                },
                |t| {
                    let (var, mean) = t[0].clone().var_mean_bias(2);
                    (t[0].clone() - mean).div(var.add_scalar(1e-6).sqrt()) * t[1].clone()
                        + t[2].clone()
                },
            );
            check(
                "rms_norm",
                &[x.clone(), gamma.clone()],
                |t| super::super::rms_norm(t[0].clone(), t[1].clone().reshape([d]), 1e-6),
                |t| {
                    let ms = t[0].clone().powi_scalar(2).mean_dim(2);
                    t[0].clone().div(ms.add_scalar(1e-6).sqrt()) * t[1].clone()
                },
            );
            for act in [
                Activation::Gelu,
                Activation::GeluTanh,
                Activation::Relu,
                Activation::Silu,
                Activation::QuickGelu,
            ] {
                check(
                    &format!("{act:?}"),
                    std::slice::from_ref(&x),
                    |t| super::super::activate(t[0].clone(), act),
                    |t| match act {
                        Activation::Gelu => burn_act::gelu(t[0].clone()),
                        Activation::GeluTanh => burn_act::gelu_approximate(t[0].clone()),
                        Activation::Relu => burn_act::relu(t[0].clone()),
                        Activation::Silu => burn_act::silu(t[0].clone()),
                        Activation::QuickGelu => {
                            t[0].clone() * burn_act::sigmoid(t[0].clone().mul_scalar(1.702))
                        }
                    },
                );
            }
        }
    }

    #[test]
    fn composed_defaults_match_burn_autodiff() {
        // the defaults (the bodies NdArray, Wgpu and Cuda run) against burn's autodiff: the
        // backward formulas of the trait's doc comments
        let x = rand([3, 23], 11).inner();
        let gamma = rand([23], 12).inner();
        let g = rand([3, 23], 13).inner();
        let [dx, dgamma, dbeta] = composed::layer_norm_backward::<Flex>(
            float(x.clone()),
            float(gamma.clone()),
            float(g.clone()),
            1e-5,
        );
        let xa = Tensor::<AD, 2>::from_inner(x.clone()).require_grad();
        let ga = Tensor::<AD, 1>::from_inner(gamma.clone()).require_grad();
        let ba = Tensor::<AD, 1>::zeros([23], &Default::default()).require_grad();
        let (var, mean) = xa.clone().var_mean_bias(1);
        let y = (xa.clone() - mean).div(var.add_scalar(1e-5).sqrt()) * ga.clone().unsqueeze()
            + ba.clone().unsqueeze();
        let grads = (y * Tensor::from_inner(g.clone())).sum().backward();
        let want = [
            xa.grad(&grads).unwrap().into_data(),
            ga.grad(&grads).unwrap().into_data(),
            ba.grad(&grads).unwrap().into_data(),
        ];
        for (got, want) in [
            tensor::<Flex, 2>(dx).into_data(),
            tensor::<Flex, 1>(dgamma).into_data(),
            tensor::<Flex, 1>(dbeta).into_data(),
        ]
        .iter()
        .zip(&want)
        {
            got.assert_approx_eq::<f32>(want, Tolerance::absolute(1e-5));
        }
        let [dx, dw] = composed::rms_norm_backward::<Flex>(
            float(x.clone()),
            float(gamma.clone()),
            float(g.clone()),
            1e-5,
        );
        let xa = Tensor::<AD, 2>::from_inner(x).require_grad();
        let wa = Tensor::<AD, 1>::from_inner(gamma).require_grad();
        let ms = xa.clone().powi_scalar(2).mean_dim(1);
        let y = xa.clone().div(ms.add_scalar(1e-5).sqrt()) * wa.clone().unsqueeze();
        let grads = (y * Tensor::from_inner(g)).sum().backward();
        tensor::<Flex, 2>(dx).into_data().assert_approx_eq::<f32>(
            &xa.grad(&grads).unwrap().into_data(),
            Tolerance::absolute(1e-5),
        );
        tensor::<Flex, 1>(dw).into_data().assert_approx_eq::<f32>(
            &wa.grad(&grads).unwrap().into_data(),
            Tolerance::absolute(1e-5),
        );
    }
}
