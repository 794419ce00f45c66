//! Backends chosen by cargo features and picked at run time with `--backend`.

use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// burn-flex: pure-Rust CPU backend (SIMD + threads), the default.
    #[cfg(feature = "flex")]
    Flex,
    /// burn-ndarray CPU backend.
    #[cfg(feature = "ndarray")]
    Ndarray,
    /// wgpu (Vulkan/Metal/GL; runs on Mesa's CPU drivers without a GPU).
    #[cfg(feature = "wgpu")]
    Wgpu,
    /// CUDA through CubeCL (loads the driver at run time).
    #[cfg(feature = "cuda")]
    Cuda,
}

impl Default for BackendKind {
    fn default() -> Self {
        #[cfg(feature = "flex")]
        return BackendKind::Flex;
        #[cfg(all(not(feature = "flex"), feature = "ndarray"))]
        return BackendKind::Ndarray;
        #[cfg(all(not(feature = "flex"), not(feature = "ndarray"), feature = "cuda"))]
        return BackendKind::Cuda;
        #[cfg(all(
            not(feature = "flex"),
            not(feature = "ndarray"),
            not(feature = "cuda"),
            feature = "wgpu"
        ))]
        return BackendKind::Wgpu;
    }
}

impl BackendKind {
    /// Whether tensors live in host memory (flex, ndarray).
    pub fn is_cpu(self) -> bool {
        match self {
            #[cfg(feature = "flex")]
            BackendKind::Flex => true,
            #[cfg(feature = "ndarray")]
            BackendKind::Ndarray => true,
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu => false,
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => false,
        }
    }

    /// `--sparse-kernels` runs host kernels: an error on a GPU backend.
    pub fn check_sparse_kernels(self) -> anyhow::Result<()> {
        if !self.is_cpu() {
            anyhow::bail!(
                "--sparse-kernels: the sparse kernels run on the CPU; use --backend flex or ndarray, not {}",
                self.to_possible_value()
                    .map_or_else(|| format!("{self:?}"), |v| v.get_name().to_string())
            );
        }
        Ok(())
    }
}

/// Runs `$body` with the type alias `B` and value `device` bound to the chosen backend.
#[macro_export]
macro_rules! with_backend {
    ($kind:expr, |$device:ident: $b:ident| $body:expr) => {{
        use $crate::backend::BackendKind;
        match $kind {
            #[cfg(feature = "flex")]
            BackendKind::Flex => {
                type $b = burn::backend::Flex;
                let $device = burn::backend::flex::FlexDevice;
                $body
            }
            #[cfg(feature = "ndarray")]
            BackendKind::Ndarray => {
                type $b = burn::backend::NdArray;
                let $device = burn::backend::ndarray::NdArrayDevice::Cpu;
                $body
            }
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu => {
                type $b = burn::backend::Wgpu;
                let $device = burn::backend::wgpu::WgpuDevice::default();
                $body
            }
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => {
                type $b = burn::backend::Cuda;
                let $device = burn::backend::cuda::CudaDevice::default();
                $body
            }
        }
    }};
}

/// A command's work on one model, generic over the backend and the model family.
pub trait ModelJob {
    fn run<B: burn::prelude::Backend, M: ressa_models::VisionLanguageModel<B>>(
        self,
        config: M::Config,
        device: &B::Device,
    ) -> anyhow::Result<()>;
}

struct Visit<'d, B: burn::prelude::Backend, J> {
    job: J,
    device: &'d B::Device,
}

impl<B: burn::prelude::Backend, J: ModelJob> ressa_models::FamilyVisitor<B> for Visit<'_, B, J> {
    type Output = anyhow::Result<()>;
    fn visit<M: ressa_models::VisionLanguageModel<B>>(self, config: M::Config) -> Self::Output {
        self.job.run::<B, M>(config, self.device)
    }
}

/// Runs `job` on the backend `kind` with the family `model_dir/config.json` names.
pub fn run_model_job<J: ModelJob>(
    kind: BackendKind,
    model_dir: &std::path::Path,
    job: J,
) -> anyhow::Result<()> {
    let config = model_dir.join("config.json");
    crate::with_backend!(kind, |device: B| {
        ressa_models::visit_family::<B, _>(
            &config,
            Visit::<B, J> {
                job,
                device: &device,
            },
        )?
    })
}

static REVISION: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// `--revision`, for [`model_dir`].
pub fn set_revision(revision: Option<String>) {
    let _ = REVISION.set(revision);
}

/// A model given as a directory, or as a repo id in the local Hugging Face cache (at
/// `--revision`).
pub fn model_dir(spec: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    let revision = REVISION.get().and_then(|r| r.as_deref());
    Ok(ressa_models::resolve_model_dir(spec, revision)?)
}
