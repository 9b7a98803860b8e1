//! Backward kernels for training LoRA adapters on a frozen base: for each forward op on the
//! UNet's path, the gradient with respect to its input (and to the adapter's parameters where
//! it has some), plus the optimizer. As for the forward ops, each family is one WGSL file in
//! `shaders/` (`grad_*.wgsl`, `optim.wgsl`), one module here with the GPU constructor and its
//! CPU reference (`reference`, f64, checked against finite differences), and tests in
//! `tests/engine/grad_*.rs`.
pub mod attention;
pub mod activation;
pub mod norm;
pub mod linear;
pub mod conv;
pub mod optim;
