//! Engine tests: every kernel against its CPU reference on the machine's adapter (lavapipe in
//! CI), with and without the optional features, plus naga validation of every shader variant.
//! A missing adapter fails these tests; it never skips them.

mod adapter_kernels;
mod attention;
mod bench_lora;
mod bench_unet;
mod checkpoint;
mod clip;
mod common;
mod conv;
mod elementwise;
mod eval;
mod gradcheck;
mod grad_attention;
mod grad_activation;
mod grad_norm;
mod grad_linear;
mod grad_conv;
mod grad_optim;
mod layout;
mod lora_apply;
mod lora_fixtures;
mod lora_merge;
mod lora_parse;
mod lora_resize;
mod matmul;
mod norm;
mod pipeline;
mod prompt;
mod quantize;
mod runtime;
mod safetensors_io;
mod sampler;
mod shaders;
mod textual_inversion;
mod tokenizer;
mod train_unet;
mod vae;
mod unet;
mod train_data;
mod train_export;
mod train_handoff;
mod train_loop;
mod train_cli;
mod train_clip;
mod bench_train;
